"""The requester's commands: ls, request, wait, status, show, extend, release, cancel, env and
break-glass. Thin: the broker decides, broker/cli/flow.py gets the credential, these say what
happened."""

from __future__ import annotations

import click

from ..client.credentials import (
    environment,
    export_lines,
    ssh_hint,
    write_ssh_files,
)
from ..client.errors import ClientError
from . import flow
from .context import Client, F, client, client_options
from .output import duration_words, emit_json, grant_block, grant_line, say, when

LIVE = ("pending", "approved", "issuing", "active", "revoke_failed")


def timeout_option(command: F) -> F:
    return click.option(
        "--timeout",
        type=click.FloatRange(0, min_open=False),
        default=None,
        help="Seconds to wait for approval (default: until the request expires); exit 4 after.",
    )(command)


@click.command("ls")
@client_options
@click.option("--all", "everything", is_flag=True, help="Also what you may not request, and why.")
def list_entitlements(broker: str | None, as_json: bool, everything: bool) -> None:
    """The entitlements you may request: longest window, and whether approval is needed."""
    listed = client(broker).api.entitlements(everything)
    if as_json:
        emit_json(listed)
        return
    if not listed:
        click.echo("you may request nothing on this broker")
    for item in listed:
        approval = item.get("approval")
        needs = f"needs {approval['rule']}" if approval else "no approval needed"
        extra = ", break-glass" if item.get("break_glass") else ""
        if item.get("eligible", True):
            click.echo(
                f"{item['name']:<22} up to {duration_words(item['max_duration']):<8} {needs}{extra}"
            )
            if item.get("description"):
                click.echo(f"{'':<22} {item['description']}")
        else:
            click.echo(f"{item['name']:<22} not for you: {item.get('why_not', '')}")


@click.command("request")
@client_options
@click.argument("entitlement")
@click.option("--for", "duration", metavar="DURATION", help="e.g. 30m, 2h (default: the policy's).")
@click.option("--reason", required=True, help="Why you need it (recorded, shown to approvers).")
@click.option("--ticket", help="The ticket, where the policy asks for one (e.g. INC-1).")
@click.option("--no-wait", is_flag=True, help="Return at once; exit 4 while approval is pending.")
@timeout_option
def request_command(
    broker: str | None,
    as_json: bool,
    entitlement: str,
    duration: str | None,
    reason: str,
    ticket: str | None,
    no_wait: bool,
    timeout: float | None,
) -> None:
    """Ask for ENTITLEMENT; wait for approval when it needs one, then activate it.

    The credential is kept for `jit exec` and `jit env`, never printed. Ctrl-C stops waiting,
    not the request: `jit wait ID` resumes.
    """
    found = client(broker)
    answer, private_key = flow.request(found, entitlement, duration, reason, ticket)
    obtained = flow.keep(found, answer, private_key)
    if obtained.record is None:
        if as_json and no_wait:
            emit_json(obtained.grant)
        elif not no_wait:
            say(f"request {obtained.grant['id']} needs approval; waiting (Ctrl-C stops waiting)")
        obtained = flow.settle(found, obtained.grant, timeout, wait=not no_wait)
    _report_active(found, obtained, as_json)


@click.command("wait")
@client_options
@click.argument("grant_id", metavar="ID")
@timeout_option
def wait_command(broker: str | None, as_json: bool, grant_id: str, timeout: float | None) -> None:
    """Wait for request ID to be approved, then activate it (resumes `jit request`)."""
    found = client(broker)
    obtained = flow.settle(found, found.api.grant(grant_id), timeout)
    _report_active(found, obtained, as_json)


@click.command("break-glass")
@client_options
@click.argument("entitlement")
@click.option("--reason", required=True, help="The emergency (at least 10 characters).")
@click.option("--for", "duration", metavar="DURATION", help="Default: the break-glass maximum.")
@click.option("--yes", is_flag=True, help="Do not ask to type the entitlement's name.")
def break_glass(
    broker: str | None,
    as_json: bool,
    entitlement: str,
    reason: str,
    duration: str | None,
    yes: bool,
) -> None:
    """The emergency path: ENTITLEMENT at once, without approval, logged and reviewed after."""
    click.secho(
        f"BREAK-GLASS: {entitlement} is issued at once without approval. This is logged, the "
        "security channel is told now, and the grant must be reviewed afterwards.",
        err=True,
        fg="red",
        bold=True,
    )
    if not yes:
        try:
            typed = click.prompt(f"Type {entitlement} to confirm", err=True, default="")
        except click.Abort:  # end of input: nobody there to type it
            raise click.UsageError(
                "type the entitlement's name to confirm, or give --yes"
            ) from None
        if typed.strip() != entitlement:
            raise click.UsageError("the name typed does not match; nothing was requested")
    found = client(broker)
    answer, private_key = flow.request(found, entitlement, duration, reason, None, True)
    _report_active(found, flow.keep(found, answer, private_key), as_json)


def _report_active(found: Client, obtained: flow.Obtained, as_json: bool) -> None:
    grant = obtained.grant
    if as_json:
        emit_json(grant)
        return
    end = grant["window"]["end"]
    say(f"{grant['entitlement']} is active until {when(end)}: grant {grant['id']}")
    if obtained.record is None:
        say("its credential was shown elsewhere; jit cannot use it here")
        return
    click.echo(
        f"  run with it:  jit exec {grant['entitlement']} -- COMMAND\n"
        f'  in a shell:   eval "$(jit env {grant["id"]})"\n'
        f"  release it:   jit release {grant['id']}",
        err=True,
    )


@click.command("status")
@client_options
def status_command(broker: str | None, as_json: bool) -> None:
    """Your live grants and requests, with the time left."""
    live = [g for g in client(broker).api.my_requests() if g["status"] in LIVE]
    if as_json:
        emit_json(live)
        return
    if not live:
        click.echo("no live grants or requests")
    for grant in live:
        click.echo(grant_line(grant))


@click.command("show")
@client_options
@click.argument("grant_id", metavar="ID")
def show(broker: str | None, as_json: bool, grant_id: str) -> None:
    """A grant: state, window, approvals, and its audit chain."""
    found = client(broker)
    grant = found.api.grant(grant_id)
    chain = found.api.chain(grant_id)
    if as_json:
        emit_json({**grant, "chain": chain})
        return
    click.echo(grant_block(grant))
    click.echo("chain")
    for entry in chain:
        click.echo(
            f"  {entry['seq']:>6}  {when(entry['at'])}  {entry['type']:<13} {entry['actor']}"
        )


@click.command("extend")
@client_options
@click.argument("grant_id", metavar="ID")
@click.option("--by", "duration", required=True, metavar="DURATION", help="How much longer.")
def extend(broker: str | None, as_json: bool, grant_id: str, duration: str) -> None:
    """Make grant ID's window longer: a new credential replaces the old one (kept for you)."""
    found = client(broker)
    grant = found.api.grant(grant_id)
    body: dict[str, object] = {"duration": duration}
    private_key = flow.ssh_key_for(found, grant["entitlement"], body)
    obtained = flow.keep(found, found.api.act(grant_id, "extend", body), private_key)
    if as_json:
        emit_json(obtained.grant)
        return
    say(f"grant {grant_id} now ends {when(obtained.grant['window']['end'])}")


@click.command("release")
@client_options
@click.argument("grant_id", metavar="ID")
def release(broker: str | None, as_json: bool, grant_id: str) -> None:
    """End grant ID now: the broker revokes the credential and verifies it is gone."""
    _close(client(broker), grant_id, "release", as_json)


@click.command("cancel")
@client_options
@click.argument("grant_id", metavar="ID")
def cancel(broker: str | None, as_json: bool, grant_id: str) -> None:
    """Withdraw request ID while it waits for approval (or before it is activated)."""
    _close(client(broker), grant_id, "cancel", as_json)


def _close(found: Client, grant_id: str, action: str, as_json: bool) -> None:
    grant = found.api.act(grant_id, action)
    found.credentials.forget(grant_id)
    if as_json:
        emit_json(grant)
        return
    say(f"grant {grant_id} is {grant['status']}")


@click.command("env")
@client_options
@click.argument("target", metavar="ID|ENTITLEMENT")
def env(broker: str | None, as_json: bool, target: str) -> None:
    """Print `export` lines for a live grant's credential: eval "$(jit env ID)"."""
    found = client(broker)
    record = live_record(found, target)
    ssh_files = None
    if record["credential"].get("type") == "ssh":
        ssh_files = write_ssh_files(found.credentials.ssh_folder(record["id"]), record)
    variables = environment(record, found.session.info().vault_addr, ssh_files)
    if as_json:
        emit_json({"grant": record["id"], "env": variables})
        return
    click.echo(export_lines(variables), nl=False)
    if ssh_files:
        click.echo(f"# {ssh_hint(ssh_files)}")


def live_record(found: Client, target: str) -> dict:
    """The kept credential of grant `target`, or of a live grant of entitlement `target`,
    confirmed active with the broker (a grant found over is forgotten)."""
    if not _looks_like_id(target):
        record = flow.live_kept(found, target)
        if record is None:
            raise ClientError(
                f"no live credential of {target} kept here; get one with: jit request {target}"
            )
        return record
    record = found.credentials.get(target)
    if record is None:
        raise ClientError(f"no credential of grant {target} kept here")
    grant = found.api.grant(target)
    if grant["status"] != "active":
        found.credentials.forget(target)
        raise ClientError(f"grant {target} is {grant['status']}, not active")
    return record


def _looks_like_id(text: str) -> bool:
    return len(text) == 36 and text.count("-") == 4


COMMANDS = [
    list_entitlements,
    request_command,
    wait_command,
    status_command,
    show,
    extend,
    release,
    cancel,
    env,
    break_glass,
]
