"""jit exec: run a command with a credential in its environment for as long as the window lasts,
then release the grant. The command's exit status is jit's; an SSH key and certificate live in a
private temporary directory only while the command runs."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from ..client.credentials import environment, ssh_hint, write_ssh_files
from ..client.errors import ClientError
from ..client.runner import run_in_window
from ..models import parse_time
from . import flow
from .context import Client, client
from .grants import timeout_option
from .output import say, when


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--broker", envvar="JIT_BROKER", metavar="URL", help="The broker.")
@click.option("--for", "duration", metavar="DURATION", help="e.g. 30m (a new grant only).")
@click.option("--reason", help="Why (needed when a new grant is requested).")
@click.option("--ticket", help="The ticket, where the policy asks for one.")
@click.option("--keep", is_flag=True, help="Keep the grant when the command exits.")
@timeout_option
@click.argument("entitlement")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(
    broker: str | None,
    duration: str | None,
    reason: str | None,
    ticket: str | None,
    keep: bool,
    timeout: float | None,
    entitlement: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with a credential of ENTITLEMENT: jit exec ENT --reason ... -- COMMAND ARGS.

    Reuses a live grant of ENTITLEMENT kept here, or requests one (waiting for approval when
    needed). The credential is in the command's environment (VAULT_ADDR/VAULT_TOKEN; PGHOST,
    PGPORT, PGUSER, PGPASSWORD, PGDATABASE; JIT_SSH_KEY/JIT_SSH_CERT). Signals go on to the
    command; it is warned a minute before the window ends and stopped at the end (SIGTERM, then
    SIGKILL). A grant requested here is released when the command exits, unless --keep. The
    exit status is the command's (127: not found).
    """
    found = client(broker)
    record, requested = _credential(found, entitlement, duration, reason, ticket, timeout)
    private_dir = None
    try:
        ssh_files = None
        if record["credential"].get("type") == "ssh":
            private_dir = Path(tempfile.mkdtemp(prefix="jit-ssh-"))
            ssh_files = write_ssh_files(private_dir, record)
            say(f"SSH key and certificate for this command: {ssh_hint(ssh_files)}")
        variables = environment(record, found.session.info().vault_addr, ssh_files)
        end_text = record["window_end"]
        end = parse_time(end_text)
        say(f"running with grant {record['id']} ({entitlement}), window ends {when(end_text)}")
        outcome = run_in_window(list(command), {**os.environ, **variables}, end, say)
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
        if requested and not keep:
            _release(found, record["id"])
    if outcome.stopped_at_window_end:
        say(f"the window of grant {record['id']} ended; the command was stopped")
    sys.exit(outcome.status)


def _credential(
    found: Client,
    entitlement: str,
    duration: str | None,
    reason: str | None,
    ticket: str | None,
    timeout: float | None,
) -> tuple[dict, bool]:
    """A live kept credential of the entitlement (reused), or a new grant's; and whether this
    command requested it (so releases it)."""
    reused = flow.live_kept(found, entitlement)
    if reused is not None:
        return reused, False
    if not reason:
        raise click.UsageError(f"no live grant of {entitlement} here: give --reason to request one")
    answer, private_key = flow.request(found, entitlement, duration, reason, ticket)
    obtained = flow.keep(found, answer, private_key)
    if obtained.record is None:
        say(f"request {obtained.grant['id']} needs approval; waiting (Ctrl-C stops waiting)")
        obtained = flow.settle(found, obtained.grant, timeout)
    if obtained.record is None:
        raise ClientError(f"grant {obtained.grant['id']} is active, but its credential is not here")
    return obtained.record, True


def _release(found: Client, grant_id: str) -> None:
    """Release the grant and forget its credential; a failure is said, not raised: the
    command's exit status stays jit's, and the window ends the credential anyway."""
    try:
        found.api.act(grant_id, "release")
        say(f"released grant {grant_id}")
    except ClientError as exc:
        say(f"could not release grant {grant_id} ({exc}); run: jit release {grant_id}")
    finally:
        found.credentials.forget(grant_id)


COMMANDS = [exec_command]
