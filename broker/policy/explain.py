"""Explaining a decision to people: what `jit policy explain` prints, the verdict, every reason,
and who approves or reviews. Decides nothing itself: it words what decide() found."""

from __future__ import annotations

from datetime import datetime

from ..durations import format_duration
from ..models import Principal, Task
from .decide import Policy, decide
from .model import Entitlement


def explain(
    policy: Policy,
    principal: Principal,
    entitlement: str,
    duration: int | None,
    now: datetime | None = None,
    reason: str | None = None,
    ticket: str | None = None,
    active: int = 0,
    break_glass: bool = False,
    task: Task | None = None,
) -> str:
    """The decision in words for people: the verdict, every reason, and who could approve (or,
    for break-glass, who reviews it); for a task, what it is and each tool's token lifetime."""
    decision = decide(
        policy, principal, entitlement, duration, now, reason, ticket, active, break_glass, task
    )
    who = f"{principal.display} ({principal.kind}"
    who += f", groups: {', '.join(principal.groups)})" if principal.groups else ")"
    if not decision.allowed:
        verdict = f"refused ({decision.error})"
    elif break_glass:
        verdict = "allowed through break-glass, issued at once, reviewed afterwards"
    elif decision.approvals_required:
        verdict = f"allowed after {decision.approvals_required} approval" + (
            "s" if decision.approvals_required > 1 else ""
        )
    elif decision.auto_approved:
        verdict = "allowed, auto-approved, issued at once"
    else:
        verdict = "allowed, issued at once"
    lines = [f"{entitlement} for {who}: {verdict}"]
    mark = "+" if decision.allowed else "-"
    lines += [f"  {mark} {text}" for text in decision.reasons]
    found = policy.entitlements.get(entitlement)
    if found is None:
        lines.append(f"  entitlements in the policy: {', '.join(policy.entitlements) or 'none'}")
        return "\n".join(lines)
    if break_glass:
        return "\n".join(lines)
    if reason is None and found.reason.min_length:
        lines.append(f"  ? a reason of at least {found.reason.min_length} characters is required")
    if ticket is None and found.reason.ticket is not None:
        lines.append(f"  ? a ticket matching {found.reason.ticket.pattern} is required")
    lines.append(f"approval: {_approval_words(found)}")
    if found.task is not None:
        lines.append(f"task: {found.task.describe()}")
        for tool, _ in found.task.tools:
            declared = policy.tools[tool]
            lines.append(
                f"  tool {tool}: {declared.resource}, tokens live at most "
                f"{format_duration(declared.max_token_lifetime)} and never past the window end"
            )
    return "\n".join(lines)


def _approval_words(found: Entitlement) -> str:
    rule = found.approval
    if rule is None:
        return "none needed"
    text = rule.describe()
    if rule.auto_approve_groups:
        text += f"; members of {', '.join(rule.auto_approve_groups)} are auto-approved"
    if rule.expires_after:
        text += f"; a request expires unapproved after {format_duration(rule.expires_after)}"
    return text
