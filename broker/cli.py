"""The `jit` command: run the broker and check its audit chain."""

from __future__ import annotations

import json
import logging
import sys

import click
from flask import Flask

from . import audit
from .config import ConfigError, Settings, load_settings
from .store import Store


class _NoQueryStrings(logging.Filter):
    """The request log must not hold what a query string carries (an authorization code)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple) and isinstance(record.args[0], str):
            line = record.args[0]
            method, _, rest = line.partition(" ")
            path, _, protocol = rest.partition(" ")
            record.args = (f"{method} {path.split('?', 1)[0]} {protocol}", *record.args[1:])
        return True


def run_server(app: Flask) -> None:
    """Serve the app (threaded) until Ctrl-C, then stop its reaper."""
    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").addFilter(_NoQueryStrings())
    server = app.extensions["jit"].settings.server
    try:
        run_simple(server["host"], int(server["port"]), app, threaded=True, use_reloader=False)
    finally:
        app.extensions["jit"].reaper.stop()


def _store(settings: Settings) -> Store:
    if not settings.database_path.exists():
        raise click.ClickException(f"no broker database at {settings.database_path}")
    return Store(settings.database_path)


@click.group()
@click.option(
    "--config",
    "-c",
    envvar="JIT_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML config file (default: $JIT_CONFIG).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """jit-broker: just-in-time elevation with verified removal."""
    ctx.obj = load_settings(config)


@main.command()
@click.pass_obj
def serve(settings: Settings) -> None:
    """Run the broker (web UI, API and reaper) on the configured host and port."""
    from . import create_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_server(create_app(settings))


@main.group("audit")
def audit_group() -> None:
    """Read and check the audit chain (needs only the database)."""


@audit_group.command("verify")
@click.pass_obj
def audit_verify(settings: Settings) -> None:
    """Check every entry's hash and link; exit 1 naming the first broken entry."""
    result = audit.verify(_store(settings).audit_entries())
    click.echo(str(result))
    sys.exit(0 if result.ok else 1)


@audit_group.command("show")
@click.argument("grant_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry a line.")
@click.pass_obj
def audit_show(settings: Settings, grant_id: str, as_json: bool) -> None:
    """Print one grant's full chain: request, decision, issuance, revocation, verification."""
    entries = list(_store(settings).audit_entries(grant_id))
    if not entries:
        raise click.ClickException(f"no audit entries for grant {grant_id}")
    for entry in entries:
        if as_json:
            click.echo(json.dumps(entry, sort_keys=True))
        else:
            actor = entry["actor"].get("sub", "")
            details = json.dumps(entry["data"], sort_keys=True)
            click.echo(
                f"{entry['seq']:>6}  {entry['at']}  {entry['type']:<13} {actor:<24} {details}"
            )


def run() -> None:
    """The console script: a broken config is one readable line and exit 2, not a traceback."""
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"jit: {exc}", err=True)
        sys.exit(2)
