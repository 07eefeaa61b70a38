"""The operators' side of `jit`: run the broker, check its audit chain, check and explain a policy
file, print the broker's own OpenBao policy. These read the server's config and data directory;
the engineers' commands never do."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click
from flask import Flask

from .. import audit
from ..audit.absence import Cadence
from ..audit.bundle import FORMATS, BundleError, verify_bundle
from ..audit.log import AuditLog
from ..audit.signing import PublicKey, legacy_keyring
from ..audit.transit_signing import CheckpointSigningFailed, TransitCheckpointSigner
from ..audit.witness import WitnessError, kv_witness, read_witness_file, well_formed
from ..backends import POLICY_KINDS
from ..backends.vault import make_client
from ..config import Settings
from ..durations import parse_duration
from ..errors import ConfigError
from ..models import Principal, Task, isoformat, parse_time, utcnow
from ..policy import Policy, PolicyError, decide, explain, load_policy
from ..store import Store, open_store


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

    from ..web.serving import RequestHandler

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


@click.command()
@click.option("--dev", is_flag=True, help="Flask's development server, for local work.")
@click.pass_obj
def serve(settings: Settings, dev: bool) -> None:
    """Run the broker (web UI, API and reaper) on the configured host and port: under gunicorn
    ([server] workers, threads, graceful_timeout), or with --dev the development server."""
    from .. import logs

    logs.configure(settings.server["log_format"])
    if dev:
        from .. import create_app

        run_server(create_app(settings))
        return
    from ..config import check_service_settings
    from ..server import serve as serve_production

    try:
        check_service_settings(settings)  # in the master, before any worker tries
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    serve_production(settings)


@click.group("audit")
def audit_group() -> None:
    """Read, check, search and export the audit log (needs only the data directory)."""


def _audit_log(settings: Settings) -> AuditLog:
    """The log as the CLI reads it: never makes a key (a new key would disown every checkpoint).
    The checkpoint keys are read from OpenBao's transit key when a [vault] token is configured,
    besides a v1 key file's; the KV witness likewise."""
    hmac_key = settings.data_dir / "audit-hmac.key"
    vault = None
    if settings.vault["token"]:
        vault = make_client(
            settings.vault["addr"], settings.vault["token"], settings.vault["timeout"]
        )
    audit_settings = settings.audit
    return AuditLog(
        _store(settings),
        hmac_key.read_bytes() if hmac_key.exists() else b"",
        TransitCheckpointSigner(
            vault, audit_settings["transit_mount"], audit_settings["transit_key"]
        )
        if vault is not None
        else None,
        checkpoint_copy=settings.checkpoint_copy_path,
        keyring=legacy_keyring(settings.signing_key_path),
        cadence=Cadence(audit_settings["checkpoint_every"], audit_settings["checkpoint_tolerance"]),
        witness=kv_witness(vault, audit_settings["witness_kv"]) if vault is not None else None,
    )


def _pinned_keys(paths: tuple[str, ...]) -> list[PublicKey] | None:
    if not paths:
        return None
    pins = []
    for path in paths:
        try:
            pins.append(audit.load_any_public_key(Path(path).read_bytes()))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(
                f"cannot read {path}: {exc}", param_hint="--public-key"
            ) from None
    return pins


def _witnessed(audit_log: AuditLog, sources: tuple[str, ...]) -> dict[str, list[dict]]:
    """What each --witness holds: `openbao` (the [audit] witness_kv secret) or a file of JSON
    lines (checkpoints, or the bodies the SIEM received)."""
    found: dict[str, list[dict]] = {}
    for source in sources:
        try:
            if source == "openbao":
                if audit_log.witness is None:
                    raise WitnessError(
                        "--witness openbao needs [audit] witness_kv and a [vault] token"
                    )
                name, items = audit_log.witness.name, audit_log.witness.read()
            else:
                name, items = source, read_witness_file(Path(source))
            found[name] = well_formed(items, name)
        except WitnessError as exc:
            raise click.ClickException(str(exc)) from None
    return found


@audit_group.command("verify")
@click.option(
    "--bundle",
    type=click.Path(dir_okay=False, exists=True),
    help="Check an exported bundle instead of the database: offline, nothing else needed.",
)
@click.option(
    "--public-key",
    "public_keys",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A PEM key fetched earlier from /api/v1/audit/public-key (repeatable: one per key "
    "version); checkpoints must verify under these (default: the bundle's keys, or OpenBao's "
    "transit key and the broker's v1 key file).",
)
@click.option(
    "--witness",
    "witnesses",
    multiple=True,
    help="Hold the log against the checkpoints a witness kept: `openbao` (the [audit] "
    "witness_kv secret) or a file of JSON lines from the SIEM (repeatable).",
)
@click.pass_obj
def audit_verify(
    settings: Settings, bundle: str | None, public_keys: tuple[str, ...], witnesses: tuple[str, ...]
) -> None:
    """Check every entry's place, hash and link, every signed checkpoint, that no checkpoint is
    missing for the cadence, what witnesses hold, and that each grant's row is what its chain
    says; exit 1 naming the first bad sequence number (or grant) and what is wrong there."""
    pinned = _pinned_keys(public_keys)
    if bundle:
        if witnesses:
            raise click.BadParameter(
                "checks the database's log, not a bundle", param_hint="--witness"
            )
        try:
            result = verify_bundle(Path(bundle), pinned)
        except BundleError as exc:
            raise click.ClickException(str(exc)) from None
    else:
        audit_log = _audit_log(settings)
        try:
            keyring = audit_log.keyring()
            if pinned is not None:
                keyring = keyring.pinned_to(pinned)
            result = audit_log.verify(keyring, _witnessed(audit_log, witnesses), absence=True)
        except CheckpointSigningFailed as exc:
            raise click.ClickException(
                f"the checkpoint keys cannot be read: {exc} (or verify an exported bundle)"
            ) from None
        result = result.failed_with(audit_log.grant_problems())
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
    except CheckpointSigningFailed as exc:
        raise click.ClickException(f"the checkpoint keys cannot be read: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    first, last = manifest["first_seq"], manifest["last_seq"]
    span = f"seq {first} to {last}" if manifest["count"] else "no entries"
    click.echo(
        f"{target}: {manifest['count']} entries ({span}), {manifest['checkpoints']} signed "
        f"checkpoints, format {fmt}"
    )


@click.group("policy")
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


@click.command("vault-policy")
def vault_policy() -> None:
    """Print the broker's own least-privilege OpenBao policy, to install with `bao policy write`."""
    from ..backends.vault import openbao_policy

    click.echo(openbao_policy(), nl=False)
