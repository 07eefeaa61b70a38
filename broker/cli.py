"""The `jit` command: run the broker, check its audit chain, check and explain a policy file,
print the broker's own OpenBao policy."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flask import Flask

from . import audit
from .audit.bundle import FORMATS, BundleError, verify_bundle
from .audit.log import AuditLog
from .backends import POLICY_KINDS
from .config import ConfigError, Settings, load_settings
from .durations import parse_duration
from .errors import StoreUnavailable
from .models import Principal, Task, isoformat, parse_time, utcnow
from .policy import Policy, PolicyError, decide, explain, load_policy
from .store import Store, open_store


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
    """Serve the app (threaded) until Ctrl-C or SIGTERM, then stop its services' threads."""
    from werkzeug.serving import run_simple

    from .web.serving import RequestHandler

    logging.getLogger("werkzeug").addFilter(_NoQueryStrings())
    server = app.extensions["jit"].settings.server
    # SIGTERM (a service manager's stop) ends the server like Ctrl-C, so the services stop and
    # the reaper signs the last checkpoint.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_simple(
            server["host"],
            int(server["port"]),
            app,
            threaded=True,
            use_reloader=False,
            request_handler=RequestHandler,  # the API's JSON errors for what http.server refuses
        )
    finally:
        app.extensions["jit"].stop()


def _store(settings: Settings) -> Store:
    """The broker's store, read as it is (never migrated from here)."""
    if not settings.storage["url"] and not settings.database_path.exists():
        raise click.ClickException(f"no broker database at {settings.database_path}")
    return open_store(settings)


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
    # `jit policy ...` reads only the policy file it is given, `jit vault-policy` only the
    # package: no config, no database.
    needs_no_config = ctx.invoked_subcommand in ("policy", "vault-policy")
    ctx.obj = None if needs_no_config else load_settings(config)


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
    """Read, check, search and export the audit log (needs only the data directory)."""


def _audit_log(settings: Settings) -> AuditLog:
    """The log as the CLI reads it: never makes a key (a new key would disown every checkpoint)."""
    hmac_key = settings.data_dir / "audit-hmac.key"
    signing = settings.signing_key_path
    return AuditLog(
        _store(settings),
        hmac_key.read_bytes() if hmac_key.exists() else b"",
        public_key=audit.load_private_key(signing).public_key() if signing.exists() else None,
        checkpoint_copy=settings.checkpoint_copy_path,
    )


def _pinned_key(path: str | None) -> Ed25519PublicKey | None:
    if path is None:
        return None
    try:
        return audit.load_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--public-key") from None


@audit_group.command("verify")
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, exists=True),
    help="Check an exported bundle instead of the database: offline, nothing else needed.",
)
@click.option(
    "--public-key",
    "public_key",
    type=click.Path(dir_okay=False),
    help="The PEM key fetched earlier from /api/v1/audit/public-key; checkpoints must verify "
    "under it (default: the bundle's key, or the broker's own key file).",
)
@click.pass_obj
def audit_verify(settings: Settings, bundle: str | None, public_key: str | None) -> None:
    """Check every entry's place, hash and link, and every signed checkpoint; exit 1 naming the
    first bad sequence number and what is wrong there."""
    pinned = _pinned_key(public_key)
    if bundle:
        try:
            result = verify_bundle(Path(bundle), pinned)
        except BundleError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        result = _audit_log(settings).verify(pinned)
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
        _echo_entry(entry, as_json)


def _echo_entry(entry: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(entry, sort_keys=True))
        return
    actor = entry["actor"].get("sub", "")
    details = json.dumps(entry["data"], sort_keys=True)
    grant = entry["grant_id"] or "-"
    click.echo(
        f"{entry['seq']:>6}  {entry['at']}  {entry['type']:<13} {actor:<24} {grant}  {details}"
    )


@audit_group.command("lookup")
@click.argument("value")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry a line.")
@click.pass_obj
def audit_lookup(settings: Settings, value: str, as_json: bool) -> None:
    """Does VALUE (a token accessor, lease id, database user name, certificate serial) appear in
    the log? The log holds only HMACs of these; exit 0 and print the entries, or exit 1."""
    audit_log = _audit_log(settings)
    if not audit_log.fingerprint_key:
        raise click.ClickException(f"no HMAC key in {settings.data_dir}: nothing was logged here")
    found = audit_log.lookup(value)
    if not found:
        click.echo("not found: the value appears in no audit entry")
        sys.exit(1)
    for entry in found:
        _echo_entry(entry, as_json)


def _moment(value: str | None, name: str) -> str:
    """A date or ISO 8601 time as the log writes times (UTC, seconds, Z); "" for none."""
    if not value:
        return ""
    try:
        return isoformat(parse_time(value if "T" in value else value + "T00:00:00Z"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date (2026-11-01) or UTC time (2026-11-01T12:00:00Z)",
            param_hint=name,
        ) from None


@audit_group.command("export")
@click.option("--since", help="From this date or UTC time (inclusive).")
@click.option("--until", help="Up to this date or UTC time (exclusive).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option(
    "--output", "-o", required=True, type=click.Path(dir_okay=False), help="The bundle (a zip)."
)
@click.pass_obj
def audit_export(
    settings: Settings, since: str | None, until: str | None, fmt: str, output: str
) -> None:
    """Write a bundle: the entries in [since, until), the signed checkpoints over them and the
    public key. `jit audit verify --bundle FILE` checks it anywhere, offline."""
    since, until = _moment(since, "--since"), _moment(until, "--until")
    if since and until and since >= until:
        raise click.BadParameter("--since must be before --until", param_hint="--since")
    target = Path(output)
    if target.exists():
        raise click.ClickException(f"{target} exists; choose a new file name")
    audit_log = _audit_log(settings)
    partial = target.with_name(target.name + ".partial")
    try:
        manifest = audit_log.export(partial, fmt, since, until)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    first, last = manifest["first_seq"], manifest["last_seq"]
    span = f"seq {first} to {last}" if manifest["count"] else "no entries"
    click.echo(
        f"{target}: {manifest['count']} entries ({span}), {manifest['checkpoints']} signed "
        f"checkpoints, format {fmt}"
    )


@main.group("policy")
def policy_group() -> None:
    """Check a policy file and explain its decisions (needs only the file, no config)."""


def _policy_or_exit(path: str) -> Policy:
    """The policy, or every problem as FILE:LINE: message and exit 1 (a missing file: exit 2)."""
    try:
        return load_policy(Path(path), POLICY_KINDS)
    except PolicyError as exc:
        if not Path(path).is_file():
            click.echo(f"jit: {exc}", err=True)
            sys.exit(2)
        click.echo(str(exc))
        sys.exit(1)


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Check FILE; print every problem with its line and exit 1, or one ok line and exit 0."""
    policy = _policy_or_exit(file)
    count = len(policy.entitlements)
    noun = "entitlement" if count == 1 else "entitlements"
    tools = f", {len(policy.tools)} tool{'' if len(policy.tools) == 1 else 's'}"
    click.echo(
        f"{file}: ok ({count} {noun}{tools if policy.tools else ''}, version {policy.version[:12]})"
    )


@policy_group.command("explain")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--as", "user", required=True, help="The requester: subject (or client id).")
@click.option("--groups", default="", help="Comma-separated groups, e.g. sre,dba.")
@click.option("--email", default="", help="The requester's email address.")
@click.option("--agent", is_flag=True, help="The requester is an agent (client id = --as).")
@click.option("--entitlement", "-e", required=True, help="The entitlement asked for.")
@click.option("--duration", default=None, help="e.g. 30m, 2h (default: the entitlement's).")
@click.option("--reason", default=None, help="The reason (not checked when left out).")
@click.option("--ticket", default=None, help="The ticket (not checked when left out).")
@click.option("--at", "at", default=None, help="When, ISO 8601 (default: now), for schedules.")
@click.option("--active", default=0, type=int, help="Open grants the requester already holds.")
@click.option("--break-glass", is_flag=True, help="Ask for the emergency path instead.")
@click.option("--agent-for", default=None, help="A task: the agent (client id) it is for.")
@click.option(
    "--tool",
    "tools",
    multiple=True,
    help="A task's tool and scopes, e.g. github=issues:read,issues:write (repeatable).",
)
def policy_explain(
    file: str,
    user: str,
    groups: str,
    email: str,
    agent: bool,
    entitlement: str,
    duration: str | None,
    reason: str | None,
    ticket: str | None,
    at: str | None,
    active: int,
    break_glass: bool,
    agent_for: str | None,
    tools: tuple[str, ...],
) -> None:
    """Explain what the policy in FILE decides for one request; exit 0 if allowed, 1 if not.

    \b
    jit policy explain policy.toml --as alice --groups sre -e prod-db-admin --duration 1h
    """
    policy = _policy_or_exit(file)
    try:
        seconds = parse_duration(duration) if duration else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    try:
        now = parse_time(at) if at else utcnow()
    except ValueError:
        raise click.BadParameter(f"cannot read time {at!r}", param_hint="--at") from None
    principal = Principal(
        issuer="jit-policy-explain",
        subject=user,
        kind="agent" if agent else "human",
        name=user,
        email=email,
        groups=tuple(g.strip() for g in groups.split(",") if g.strip()),
        client_id=user if agent else "",
    )
    task = _task_option(agent_for, tools)
    request = (
        policy, principal, entitlement, seconds, now, reason, ticket, active, break_glass, task,
    )  # fmt: skip
    click.echo(explain(*request))
    sys.exit(0 if decide(*request).allowed else 1)


def _task_option(agent: str | None, tools: tuple[str, ...]) -> Task | None:
    """--agent-for and --tool as the task they describe (None: not a task request)."""
    if agent is None and not tools:
        return None
    if not agent:
        raise click.BadParameter("a task names its agent", param_hint="--agent-for")
    asked: dict[str, list[str]] = {}
    for text in tools:
        tool, _, scopes = text.partition("=")
        if not tool.strip() or not scopes.strip():
            raise click.BadParameter(f"{text!r} is not TOOL=SCOPE,SCOPE", param_hint="--tool")
        asked.setdefault(tool.strip(), []).extend(s.strip() for s in scopes.split(",") if s.strip())
    return Task.of(agent, asked)


@main.command("vault-policy")
def vault_policy() -> None:
    """Print the broker's own least-privilege OpenBao policy, to install with `bao policy write`."""
    from .backends.vault import openbao_policy

    click.echo(openbao_policy(), nl=False)


def run() -> None:
    """The console script: a broken config is one readable line and exit 2, not a traceback."""
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"jit: {exc}", err=True)
        sys.exit(2)
    except StoreUnavailable as exc:  # the database server out of reach: one line, exit 1
        click.echo(f"jit: {exc.detail}", err=True)
        sys.exit(1)
