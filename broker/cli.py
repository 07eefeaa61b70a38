"""The `jit` command: run the broker and check its audit chain."""

from __future__ import annotations

import json
import logging
import sys

import click

from .config import ConfigError, load_settings


def _app(config: str | None, reaper: bool = False):
    from . import create_app

    settings = load_settings(config, overrides={"reaper": {"enabled": reaper}})
    return create_app(settings)


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
    ctx.obj = config


@main.command()
@click.pass_obj
def serve(config: str | None) -> None:
    """Run the broker (web UI, API and reaper) on the configured host and port."""
    from werkzeug.serving import run_simple

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = _app(config, reaper=True)
    server = app.extensions["jit"].settings.server
    try:
        run_simple(server["host"], int(server["port"]), app, threaded=True, use_reloader=False)
    finally:
        app.extensions["jit"].reaper.stop()


@main.group()
def audit() -> None:
    """Read and check the audit chain."""


@audit.command("verify")
@click.pass_obj
def audit_verify(config: str | None) -> None:
    """Check every entry's hash and link; exit 1 naming the first broken entry."""
    result = _app(config).extensions["jit"].grants.verify_chain()
    click.echo(str(result))
    sys.exit(0 if result.ok else 1)


@audit.command("show")
@click.argument("grant_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry a line.")
@click.pass_obj
def audit_show(config: str | None, grant_id: str, as_json: bool) -> None:
    """Print one grant's full chain: request, decision, issuance, revocation, verification."""
    entries = _app(config).extensions["jit"].grants.chain(grant_id)
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
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"jit: {exc}", err=True)
        sys.exit(2)
