"""How the engineers' commands speak: `jit: ...` lines on stderr; times as "in 24 min (14:32)"
in local time; grants in a line or a block; the API's JSON for --json, with the secrets of a
credential left out (`jit env` is how one asks for them)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import click

from ..models import parse_time

SECRET_FIELDS = ("token", "password", "subject_token")


def say(text: str) -> None:
    """A status line for the person (stderr: stdout stays for what scripts read)."""
    click.echo(f"jit: {text}", err=True)


def emit_json(data: object) -> None:
    click.echo(json.dumps(without_secrets(data), indent=2, sort_keys=True))


def without_secrets(data: object) -> object:
    """The API's JSON with a credential's secret fields replaced by how to get them."""
    if isinstance(data, list):
        return [without_secrets(item) for item in data]
    if not isinstance(data, dict):
        return data
    shown = {key: without_secrets(value) for key, value in data.items()}
    credential = shown.get("credential")
    if isinstance(credential, dict):
        for field in SECRET_FIELDS:
            if field in credential:
                credential[field] = f"(hidden: jit env {data.get('id', 'ID')} prints it)"
    return shown


def when(text: str | None, now: datetime | None = None) -> str:
    """'in 24 min (14:32)' or '3 h ago (09:10)', local time; '-' for none."""
    if not text:
        return "-"
    moment = parse_time(text)
    now = now or datetime.now(UTC)
    seconds = int((moment - now).total_seconds())
    span = _span(abs(seconds))
    relative = f"in {span}" if seconds >= 0 else f"{span} ago"
    local = moment.astimezone()
    same_day = local.date() == now.astimezone().date()
    clock = local.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")
    return f"{relative} ({clock})"


def _span(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{seconds // 86400} d"


def duration_words(seconds: int | None) -> str:
    if not seconds:
        return "-"
    return _span(int(seconds))


def grant_line(grant: dict) -> str:
    """One grant in a line: id, entitlement, state, and the time that matters for that state."""
    status = grant["status"]
    end = (grant.get("window") or {}).get("end")
    if status == "active":
        detail = f"ends {when(end)}"
    elif status in ("pending", "approved"):
        missing = (grant.get("approvals") or {}).get("missing") or []
        detail = f"waiting for {', '.join(missing)}" if missing else "approved: jit wait activates"
    else:
        detail = grant.get("closed_reason") or ""
    return f"{grant['id']}  {grant['entitlement']:<20} {status:<18} {detail}".rstrip()


def grant_block(grant: dict) -> str:
    """A grant in full: state, window, reason, approvals, review."""
    window = grant.get("window") or {}
    lines = [
        f"grant        {grant['id']}",
        f"entitlement  {grant['entitlement']}"
        + ("  (BREAK-GLASS)" if grant.get("break_glass") else ""),
        f"status       {grant['status']}",
        f"requester    {grant.get('requester', '')}",
        f"reason       {grant.get('reason', '')}",
    ]
    if grant.get("ticket"):
        lines.append(f"ticket       {grant['ticket']}")
    lines.append(f"duration     {duration_words(grant.get('duration'))}")
    if window.get("start"):
        lines.append(f"window       {when(window.get('start'))} to {when(window.get('end'))}")
    approvals = grant.get("approvals")
    if approvals:
        given = ", ".join(f"{a['by']} {when(a['at'])}" for a in approvals.get("given", []))
        lines.append(f"approvals    {approvals['required']} required; given: {given or 'none'}")
        if approvals.get("missing"):
            lines.append(f"missing      {', '.join(approvals['missing'])}")
        if approvals.get("rule"):
            lines.append(f"who approves {approvals['rule']}")
    if grant.get("expires_unapproved_at"):
        lines.append(f"expires      {when(grant['expires_unapproved_at'])} unless approved")
    if grant.get("closed_reason"):
        lines.append(f"closed       {grant['closed_reason']}")
    review = grant.get("review")
    if review:
        done = f"by {review['by']} {when(review['at'])}" if review.get("at") else "not yet"
        lines.append(f"review       due {when(review['due'])}; {done}")
    if grant.get("last_error"):
        lines.append(f"last error   {grant['last_error']}")
    return "\n".join(lines)


def is_terminal() -> bool:
    return sys.stderr.isatty()
