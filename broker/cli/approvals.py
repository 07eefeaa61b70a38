"""The approvers' commands: the queue of requests you may decide, approve and deny."""

from __future__ import annotations

import click

from .context import client, client_options
from .output import emit_json, say, when


@click.command("approvals")
@client_options
def approvals(broker: str | None, as_json: bool) -> None:
    """Requests waiting for your approval: requester, reason, ticket and what is missing."""
    queue = client(broker).api.approval_queue()
    if as_json:
        emit_json(queue)
        return
    if not queue:
        click.echo("nothing waits for your approval")
    for grant in queue:
        approvals = grant.get("approvals") or {}
        click.echo(
            f"{grant['id']}  {grant['entitlement']} for {grant['requester']}, "
            f"{grant['duration'] // 60} min, asked {when(grant['created_at'])}"
        )
        click.echo(f"    reason: {grant['reason']}")
        if grant.get("ticket"):
            click.echo(f"    ticket: {grant['ticket']}")
        if approvals.get("missing"):
            click.echo(f"    missing: {', '.join(approvals['missing'])} ({approvals.get('rule')})")


def _decide(action: str) -> click.Command:
    @click.command(action)
    @client_options
    @click.argument("grant_id", metavar="ID")
    @click.option("--reason", required=action == "deny", default="", help="Why (required to deny).")
    def decide(broker: str | None, as_json: bool, grant_id: str, reason: str) -> None:
        grant = client(broker).api.act(grant_id, action, {"reason": reason})
        if as_json:
            emit_json(grant)
            return
        missing = (grant.get("approvals") or {}).get("missing") or []
        more = f"; still missing {', '.join(missing)}" if missing else ""
        say(f"request {grant_id} of {grant['requester']} is {grant['status']}{more}")

    decide.help = f"{action.capitalize()} request ID (recorded with your reason)."
    return decide


approve = _decide("approve")
deny = _decide("deny")

COMMANDS = [approvals, approve, deny]
