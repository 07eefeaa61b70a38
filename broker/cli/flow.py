"""Getting a live credential, shared by request, wait, exec and break-glass: create the request,
wait for its approval with a live status line, activate it, keep the credential. Ctrl-C while
waiting stops the waiting, not the request, and says how to resume."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import click

from ..client.credentials import ssh_key_pair
from ..client.errors import ClientError, Refused, StillPending
from .context import Client
from .output import is_terminal, say, when

WAITING = ("pending",)
POLL_EVERY = 2.0  # seconds between looks at a pending request


@dataclass
class Obtained:
    grant: dict  # the API's view of the grant, without its credential
    record: dict | None  # the kept credential (None: not active, e.g. --no-wait)


def backend_of(found: Client, entitlement: str) -> str:
    """The entitlement's credential kind, from what the broker lists for you."""
    for listed in found.api.entitlements(everything=True):
        if listed["name"] == entitlement:
            return str(listed.get("backend") or "")
    return ""  # unknown: the broker's refusal says so


def ssh_key_for(found: Client, entitlement: str, body: dict[str, object]) -> str:
    """For an SSH entitlement, a fresh key pair whose public half goes into `body` (the
    certificate is made for it); returns the private half ("" for other kinds)."""
    if backend_of(found, entitlement) != "ssh":
        return ""
    private_key, body["public_key"] = ssh_key_pair()
    return private_key


def live_kept(found: Client, entitlement: str) -> dict | None:
    """The kept credential of a grant of `entitlement` that the broker says is active now;
    kept credentials of grants that are over are forgotten on the way."""
    for record in found.credentials.live_for(entitlement, datetime.now(UTC)):
        if found.api.grant(record["id"])["status"] == "active":
            return record
        found.credentials.forget(record["id"])
    return None


def request(
    found: Client,
    entitlement: str,
    duration: str | None,
    reason: str,
    ticket: str | None,
    break_glass: bool = False,
) -> tuple[dict, str]:
    """Create the request; returns the answer (with the credential when issued at once) and the
    SSH private key that goes with it ("" for other kinds)."""
    body: dict[str, object] = {"entitlement": entitlement, "reason": reason}
    if duration:
        body["duration"] = duration
    if ticket:
        body["ticket"] = ticket
    if break_glass:
        body["break_glass"] = True
    private_key = ssh_key_for(found, entitlement, body)
    return found.api.request(body), private_key


def keep(found: Client, answer: dict, private_key: str = "") -> Obtained:
    """Keep the credential an answer carries; the grant view goes on without it."""
    credential = answer.pop("credential", None)
    if credential is None:
        return Obtained(answer, None)
    return Obtained(answer, found.credentials.keep(answer, credential, private_key))


def activate(found: Client, grant: dict) -> Obtained:
    """Activate an approved request of yours: the credential is issued now and kept."""
    body: dict[str, object] = {}
    private_key = ssh_key_for(found, grant["entitlement"], body)
    return keep(found, found.api.act(grant["id"], "activate", body), private_key)


def wait_until_decided(
    found: Client, grant: dict, timeout: float | None, every: float = POLL_EVERY
) -> dict:
    """Poll the request until it leaves `pending`, showing who approved, what is missing and
    who could approve; Ctrl-C or the timeout leaves it pending (StillPending)."""
    grant_id = grant["id"]
    deadline = None if timeout is None else time.monotonic() + timeout
    status = _StatusLine()
    try:
        while grant["status"] in WAITING:
            status.show(_waiting_text(grant))
            if deadline is not None and time.monotonic() >= deadline:
                status.end()
                raise StillPending(
                    f"request {grant_id} is still pending after {timeout:g} s; "
                    f"resume with: jit wait {grant_id}"
                )
            pause = every if deadline is None else max(0.0, min(every, deadline - time.monotonic()))
            time.sleep(pause)
            grant = found.api.grant(grant_id)
    except KeyboardInterrupt:
        status.end()
        raise StillPending(
            f"stopped waiting; request {grant_id} is still pending. "
            f"Resume with: jit wait {grant_id}"
        ) from None
    status.end()
    return grant


def settle(found: Client, grant: dict, timeout: float | None, wait: bool = True) -> Obtained:
    """From a request's current state to a kept credential: wait while it is pending (unless
    not `wait`), activate it once approved; a decided-against request is an error."""
    if grant["status"] == "pending":
        if not wait:
            raise StillPending(
                f"request {grant['id']} waits for approval "
                f"({', '.join(grant.get('approvals', {}).get('missing', []))}); "
                f"follow it with: jit wait {grant['id']}"
            )
        grant = wait_until_decided(found, grant, timeout)
    status = grant["status"]
    if status == "approved":
        return activate(found, grant)
    if status == "active":
        return Obtained(grant, found.credentials.get(grant["id"]))
    reason = grant.get("closed_reason")
    if status == "denied":
        raise Refused(f"request {grant['id']} was denied" + (f": {reason}" if reason else ""))
    if status == "expired_unapproved":
        raise StillPending(f"request {grant['id']} expired before it was approved")
    raise ClientError(f"request {grant['id']} is {status}" + (f": {reason}" if reason else ""))


def _waiting_text(grant: dict) -> str:
    approvals = grant.get("approvals") or {}
    given = ", ".join(a["by"] for a in approvals.get("given", []))
    parts = [f"waiting for approval of {grant['id']} ({grant['entitlement']})"]
    if given:
        parts.append(f"approved by {given}")
    if approvals.get("missing"):
        parts.append(f"missing {', '.join(approvals['missing'])}")
    if approvals.get("rule"):
        parts.append(f"approvers: {approvals['rule']}")
    if grant.get("expires_unapproved_at"):
        parts.append(f"expires {when(grant['expires_unapproved_at'])}")
    return "; ".join(parts)


class _StatusLine:
    """One line rewritten in place on a terminal; elsewhere, a new line only when it changes."""

    def __init__(self) -> None:
        self.last = ""
        self.live = is_terminal()

    def show(self, text: str) -> None:
        if text == self.last:
            return
        if self.live:
            click.echo(f"\r\033[K{text}", err=True, nl=False)
        else:
            say(text)
        self.last = text

    def end(self) -> None:
        if self.live and self.last:
            click.echo("", err=True)
        self.last = ""
