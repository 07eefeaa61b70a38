"""What the pages call things: a grant's state in the words people use (the same words on every
page and in the auditors' filter), an audit entry as a step of a grant's life with who took it,
and times as the pages show them. Words only: it reads plain data and decides nothing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..audit.search import STATE_WORD_OF, WORD_LABELS
from ..models import Approval, Grant, parse_time


def state_word(status: str) -> str:
    """The filter's word for a state (`waiting`, `active`, `ended`...): a CSS class and a value."""
    return STATE_WORD_OF.get(status, status)


def state_label(status: str) -> str:
    """The badge's text for a state."""
    return WORD_LABELS.get(state_word(status), status.replace("_", " "))


DETAILS = {
    "pending": "waiting for the approvals the policy asks for",
    "approved": "approved: the requester activates it to get the credential",
    "issuing": "the credential is being issued",
    "released": "released by the requester: the credential is being revoked",
    "expired": "the window ended: the credential is being revoked",
    "revoking": "the credential is being revoked",
    "revoked": "the credential was revoked and verified gone",
    "revoke_failed": "the credential's removal could not be verified yet: the broker retries",
}


def state_detail(status: str) -> str:
    """A sentence under the badge: where in its life the grant is (`ended` has several steps)."""
    return DETAILS.get(status, "")


def short_time(text: object) -> str:
    """`2026-11-23T10:00:00Z` as `2026-11-23 10:00 UTC`: what a page shows before the script
    turns it into local time (the UTC value stays in the title)."""
    if not text:
        return ""
    if not isinstance(text, str):
        return str(text)
    try:
        moment = parse_time(text)
    except ValueError:
        return text
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# Each entry type as a step of the grant's life: (title, class for the marker).
STEPS = {
    "request": "Requested",
    "decision": "Policy decision",
    "approval": "Approved",
    "denial": "Denied",
    "cancel": "Cancelled by the requester",
    "expire_unapproved": "Expired without approval",
    "break_glass": "Break-glass taken",
    "review": "Break-glass reviewed",
    "issue": "Credential issued",
    "issue_failed": "Issuing failed",
    "extend": "Extended: new credential",
    "extend_lost": "Extension lost a race",
    "replaced": "Credential replaced",
    "release": "Released by the requester",
    "expire": "Window ended",
    "revoke": "Revoked",
    "verify": "Removal verified",
    "revoke_failed": "Removal not verified",
    "reconcile": "Reconciled",
    "token_issued": "Tool token issued",
    "token_revoked": "Tool token revoked",
}
BROKER_ACTED = {"decision", "expire", "expire_unapproved", "revoke", "verify", "revoke_failed",
                "reconcile", "issue_failed", "extend_lost"}  # fmt: skip


@dataclass
class Step:
    seq: int
    type: str
    title: str
    at: str
    actor: str
    lines: list[str] = field(default_factory=list)
    tone: str = ""  # "bad", "glass" or ""
    data: dict = field(default_factory=dict)


def steps(entries: Iterable[dict], grant: Grant, approvals: Iterable[Approval] = ()) -> list[Step]:
    """The grant's entries as steps: who took each (the requester, an approver by name, or the
    broker: the policy decides, the reaper removes), when, and what it says in words."""
    names = {(grant.requester_iss, grant.requester_sub): grant.requester}
    names.update({(a.issuer, a.subject): a.display for a in approvals})
    found = []
    for entry in entries:
        kind, data = entry["type"], entry.get("data") or {}
        actor = entry.get("actor") or {}
        if kind == "decision":
            who = "the broker (policy " + str(data.get("policy_hash", ""))[:12] + ")"
        elif actor.get("iss") == "jit-broker" or (kind in BROKER_ACTED and not actor):
            who = f"the broker ({actor.get('sub', 'reaper')})"
        else:
            key = (actor.get("iss", ""), actor.get("sub", ""))
            who = names.get(key) or actor.get("sub") or "unknown"
        found.append(
            Step(
                seq=entry["seq"],
                type=kind,
                title=_title(kind, data),
                at=entry["at"],
                actor=who,
                lines=_lines(kind, data),
                tone=_tone(kind, data),
                data=data,
            )
        )
    return found


def _title(kind: str, data: dict) -> str:
    if kind == "decision":
        return "Policy decision: " + ("allowed" if data.get("allowed") else "refused")
    if kind == "verify":
        return "Removal verified" if data.get("gone") else "Removal check: still there"
    if kind == "review":
        return f"Break-glass reviewed: {data.get('outcome', '?')}"
    return STEPS.get(kind, kind.replace("_", " ").capitalize())


def _tone(kind: str, data: dict) -> str:
    if kind in ("break_glass",) or (kind == "review" and data.get("outcome") == "unjustified"):
        return "glass"
    if kind in ("revoke_failed", "issue_failed", "denial") or data.get("gone") is False:
        return "bad"
    return ""


def _lines(kind: str, data: dict) -> list[str]:
    """The few facts of an entry a person reads first; the whole data stays one click away."""
    lines: list[str] = []
    if kind == "request":
        lines.append(f"{data.get('entitlement', '')}, reason: {data.get('reason', '')}")
        if data.get("ticket"):
            lines.append(f"ticket {data['ticket']}")
    elif kind == "decision":
        lines += [str(r) for r in data.get("reasons") or []]
        if data.get("auto_approved"):
            lines.append(f"auto-approved: {data['auto_approved']}")
    elif kind in ("approval", "denial", "cancel", "release", "break_glass"):
        if data.get("reason"):
            lines.append(f"reason: {data['reason']}")
    elif kind == "review":
        if data.get("notes"):
            lines.append(f"notes: {data['notes']}")
    elif kind in ("issue", "extend"):
        if data.get("expires_at"):
            lines.append(f"credential ends {short_time(str(data['expires_at']))}")
    elif kind in ("revoke_failed", "issue_failed") and data.get("error"):
        lines.append(str(data["error"]))
    return lines
