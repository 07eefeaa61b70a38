"""Deciding on a policy: the Policy (the entitlements of one version of the file) evaluates
requests, break-glass, extensions, approvers and reviewers into a Decision or a Refusal, each rule a
small named check. Never reads the file, issues, stores or audits anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ..durations import format_duration
from ..models import Approval, Decision, Person, Principal, Refusal, Task, utcnow
from .model import BreakGlassRule, Entitlement, Requesters, Tool

# --- the policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Finding:
    """One rule's verdict on one request: ok with why, or the refusal code and why not."""

    ok: bool
    text: str
    code: str = ""


def _passed(text: str) -> _Finding:
    return _Finding(True, text)


def _failed(code: str, text: str) -> _Finding:
    return _Finding(False, text, code)


@dataclass(frozen=True)
class Policy:
    """One version of the policy file, and every decision made on it."""

    entitlements: dict[str, Entitlement]
    version: str  # sha256 of the file's bytes: the decision names the exact text it applied
    tools: dict[str, Tool] = field(default_factory=dict)  # the [tools] the broker issues for

    def eligible(self, principal: Principal) -> list[Entitlement]:
        """The entitlements this principal may request (requester rules only; an agent sees the
        tasks it may start itself)."""
        return [e for e in self.entitlements.values() if _requester_rule(e, principal).ok]

    def not_eligible(self, principal: Principal) -> list[tuple[Entitlement, str]]:
        """The entitlements this principal may not request, each with the requester rule's own
        explanation (what `jit ls --all` shows)."""
        found = [(e, _requester_rule(e, principal)) for e in self.entitlements.values()]
        return [(e, finding.text) for e, finding in found if not finding.ok]

    def break_glass_eligible(self, principal: Principal) -> list[Entitlement]:
        """The entitlements this principal may take through break-glass."""
        return [
            e
            for e in self.entitlements.values()
            if e.break_glass and not _break_glass_rule(e, principal).code
        ]

    def evaluate(
        self,
        principal: Principal,
        entitlement: str,
        duration: int | None,
        reason: str | None = "",
        ticket: str | None = "",
        now: datetime | None = None,
        active: int = 0,
        task: Task | None = None,
    ) -> Decision:
        """Apply every rule and say why; the first failing rule's code becomes the error.
        `duration` None takes the entitlement's default. `reason` or `ticket` None: not checked
        (a dry run that has none yet). `active`: the principal's open grants of it. `task`: the
        agent and tools asked for, required by a task entitlement and refused by any other."""
        found = self.entitlements.get(entitlement)
        if found is None:
            return self._unknown(entitlement, duration)
        now = _aware(now)
        seconds = duration if duration is not None else found.default_duration
        findings = [
            _requester_rule(found, principal),
            *_task_rules(found, principal, task, self.tools),
            _duration_rule(found, duration),
            *_reason_rule(found, reason),
            *_ticket_rule(found, ticket),
            *_schedule_rule(found, now, seconds),
            *_limit_rule(found, active),
        ]
        required, auto, approval_text = _approval_outcome(found, principal)
        return self._decide(found, seconds or 0, findings, required, auto, approval_text)

    def evaluate_break_glass(
        self,
        principal: Principal,
        entitlement: str,
        duration: int | None,
        reason: str | None,
    ) -> Decision:
        """The emergency path: only the break-glass groups, a real reason and the break-glass
        maximum count; approvals, the ticket, the schedule and max_active do not. `duration` None
        takes the break-glass maximum."""
        found = self.entitlements.get(entitlement)
        if found is None:
            return self._unknown(entitlement, duration)
        rule = _break_glass_rule(found, principal)
        if rule.code or found.break_glass is None:
            return self._decide(found, duration or 0, [rule], 0, "", "")
        glass = found.break_glass
        seconds = duration if duration is not None else glass.max_duration
        findings = [
            rule,
            _break_glass_duration_rule(found, glass, seconds),
            _break_glass_reason_rule(found, glass, reason or ""),
        ]
        bypassed = (
            "break-glass: approvals, ticket, schedule and max_active are bypassed; "
            f"{' or '.join(glass.reviewers)} must review it within "
            f"{format_duration(glass.review_within)}"
        )
        return self._decide(found, seconds, findings, 0, "", bypassed)

    def check_reviewer(
        self, grant_entitlement: str, reviewer: Principal, requester: Person,
        auditor_groups: tuple[str, ...],
    ) -> Refusal | None:  # fmt: skip
        """Why this person may not review this break-glass grant; None when they may. The
        requester's other identities (Person.is_same_as) may not review it either."""
        found = self.entitlements.get(grant_entitlement)
        reviewers = set(auditor_groups) | set(
            found.break_glass.reviewers if found and found.break_glass else ()
        )
        if reviewer.kind != "human":
            return Refusal("agent_cannot_review", "an agent cannot review a break-glass grant")
        if reviewer.person.is_same_as(requester):
            return Refusal("self_review", "you cannot review your own break-glass grant")
        if not set(reviewer.groups) & reviewers:
            return Refusal(
                "not_a_reviewer",
                f"break-glass grants of {grant_entitlement} are reviewed by members of "
                f"{' or '.join(sorted(reviewers))}; you are in "
                f"{', '.join(reviewer.groups) or 'no groups'}",
            )
        return None

    def evaluate_extension(
        self,
        principal: Principal,
        entitlement: str,
        window_start: datetime,
        window_end: datetime,
        extra: int,
        now: datetime,
    ) -> Decision:
        """May this window be made `extra` seconds longer? Decision.duration is `extra`."""
        found = self.entitlements.get(entitlement)
        if found is None:
            return self._unknown(entitlement, extra)
        now = _aware(now)
        findings = [_requester_rule(found, principal), *_extension_rules(found, extra)]
        new_end = _aware(window_end) + timedelta(seconds=max(extra, 0))
        findings += _extension_total_rule(found, _aware(window_start), new_end)
        findings += _extension_schedule_rule(found, now, new_end)
        return self._decide(found, extra, findings, 0, "", "")

    def window_end(self, entitlement: str, start: datetime, duration: int) -> datetime:
        """start + duration, cut where the current schedule slot ends. A start outside every
        slot gets an empty window: a window never runs past the schedule."""
        start = _aware(start).astimezone(UTC)
        end = start + timedelta(seconds=duration)
        schedule = self.entitlements[entitlement].schedule
        if schedule is None:
            return end
        slot = schedule.slot_at(start)
        return min(end, slot[1]) if slot else start

    def check_approver(
        self,
        entitlement: str,
        approver: Principal,
        requester: Person,
        approvals: list[Approval],
    ) -> Refusal | None:
        """Why this person may not approve this request now; None when they may. Separation of
        duties holds per person, not per account: another identity of the requester, or of
        someone who already approved, is the same person (Person.is_same_as)."""
        found = self.entitlements.get(entitlement)
        if found is None:
            return Refusal("unknown_entitlement", f"{entitlement} is no longer in the policy")
        rule = found.approval
        if rule is None:
            return Refusal("no_approval_needed", f"{entitlement} needs no approval")
        if approver.kind != "human":
            return Refusal(
                "agent_cannot_approve",
                f"an agent cannot approve; {entitlement} needs people from "
                f"{' or '.join(rule.from_groups)}",
            )
        if approver.person.is_same_as(requester):
            return Refusal("self_approval", "you cannot approve your own request")
        if not set(approver.groups) & set(rule.from_groups):
            return Refusal(
                "not_an_approver",
                f"approvals for {entitlement} come from members of "
                f"{' or '.join(rule.from_groups)}; you are in "
                f"{', '.join(approver.groups) or 'no groups'}",
            )
        if any(a.person.is_same_as(approver.person) for a in approvals):
            return Refusal("already_approved", "you have already approved this request")
        return None

    def approval_progress(
        self, entitlement: str, approvals: list[Approval]
    ) -> tuple[bool, list[str]]:
        """Are the approvals enough, and what is still missing, in words. A person counts once,
        and each group in each_of needs an approver of its own."""
        found = self.entitlements.get(entitlement)
        if found is None or found.approval is None:
            return True, []
        rule = found.approval
        counted = _distinct_approvers(approvals, rule.from_groups)
        unmatched = _groups_without_an_approver(rule.each_of, counted)
        missing = [f"one approval from {group}" for group in unmatched]
        more = rule.required - len(counted) - len(unmatched)
        if more > 0:
            missing.append(f"{more} more approval{'s' if more > 1 else ''}")
        return not missing, missing

    def _unknown(self, entitlement: str, duration: int | None) -> Decision:
        return Decision(
            False,
            entitlement,
            duration or 0,
            (f"no entitlement named {entitlement!r} in the policy",),
            self.version,
            error="unknown_entitlement",
        )

    def _decide(
        self,
        found: Entitlement,
        seconds: int,
        findings: list[_Finding],
        required: int,
        auto: str,
        approval_text: str,
    ) -> Decision:
        failures = [f for f in findings if not f.ok]
        approvers = found.approval.from_groups if found.approval and required else ()
        if failures:
            return Decision(
                False,
                found.name,
                seconds,
                tuple(f.text for f in failures),
                self.version,
                error=failures[0].code,
                approvals_required=required,
                approvers=approvers,
            )
        reasons = [f.text for f in findings]
        if approval_text:
            reasons.append(approval_text)
        return Decision(
            True,
            found.name,
            seconds,
            tuple(reasons),
            self.version,
            approvals_required=required,
            auto_approved=auto,
            approvers=approvers,
        )


def decide(
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
) -> Decision:
    """The decision for a request on the normal path or, with `break_glass`, the emergency one."""
    if break_glass:
        return policy.evaluate_break_glass(principal, entitlement, duration, reason)
    return policy.evaluate(principal, entitlement, duration, reason, ticket, now, active, task)


# --- the rules as small named checks --------------------------------------------------------------


def _admitting_rule(rules: Requesters, principal: Principal) -> str:
    """Eligibility: the requester rule that admits the principal, in words; "" when none does."""
    if principal.kind == "agent":
        for name in rules.agents:
            if name in (principal.client_id, principal.subject):
                return f"agent {name} is listed in requesters.agents"
        return ""
    if principal.kind != "human":
        return ""
    shared = [g for g in rules.groups if g in principal.groups]
    if shared:
        return f"member of {', '.join(shared)}"
    domain = principal.email.rpartition("@")[2].lower() if "@" in principal.email else ""
    if domain and domain in rules.email_domains:
        return f"email address at {domain}"
    claims = principal.claims()
    for claim, accepted in rules.claims:
        value = claims.get(claim)
        held = value if isinstance(value, list | tuple) else [value]
        matched = [v for v in accepted if v in held]
        if matched:
            return f"claim {claim} is {matched[0]}"
    return ""


def _requester_rule(found: Entitlement, principal: Principal) -> _Finding:
    if found.task is not None and principal.kind == "agent":
        return _agent_start_rule(found, principal)
    admitted = _admitting_rule(found.requesters, principal)
    if admitted:
        return _passed(admitted)
    rules = found.requesters
    people = rules.describe_people()
    if principal.kind == "agent":
        who = principal.client_id or principal.subject
        if not rules.agents:
            text = f"{found.name} admits no agents; {who} is an agent"
        else:
            text = f"{found.name} admits only the agents {', '.join(rules.agents)}; not {who}"
    elif not people:
        text = f"{found.name} admits only the agents {', '.join(rules.agents)}, not people"
    else:
        text = (
            f"{found.name} admits {people}; {principal.display} is in "
            f"{', '.join(principal.groups) or 'no groups'}"
        )
    return _failed("not_eligible", text)


def _agent_start_rule(found: Entitlement, principal: Principal) -> _Finding:
    """An agent starts a task only where the policy lets it (CI), and only for itself."""
    rule, who = found.task, principal.client_id or principal.subject
    if rule is None or not rule.agent_may_start:
        return _failed(
            "agent_may_not_start",
            f"a person starts tasks of {found.name} for an agent; {who} may not start its own",
        )
    if who not in rule.agents:
        return _failed(
            "not_eligible", f"{found.name} is a task for {', '.join(rule.agents)}; not {who}"
        )
    return _passed(f"agent {who} may start its own task (task.agent_may_start)")


def _task_rules(
    found: Entitlement, principal: Principal, task: Task | None, tools: dict[str, Tool]
) -> list[_Finding]:
    """A task names an agent of the rule and tools of the rule, each with scopes it allows; an
    agent asks only for itself. Other entitlements take no task."""
    rule = found.task
    if rule is None:
        if task is None:
            return []
        return [_failed("not_a_task", f"{found.name} grants a credential, not a task for an agent")]
    if task is None:
        return [
            _failed(
                "task_required",
                f"{found.name} is a task: name the agent ({', '.join(rule.agents)}) and the tools",
            )
        ]
    findings = []
    if principal.kind == "agent" and task.agent != (principal.client_id or principal.subject):
        findings.append(_failed("not_own_task", "an agent starts a task only for itself"))
    if task.agent not in rule.agents:
        findings.append(
            _failed(
                "agent_not_allowed",
                f"{found.name} is a task for {', '.join(rule.agents)}; not for {task.agent}",
            )
        )
    for tool, scopes in task.tools:
        allowed = rule.allowed_scopes(tool)
        if tool not in tools:
            findings.append(_failed("unknown_tool", f"no tool named {tool!r} in the policy"))
        elif allowed is None:
            findings.append(
                _failed(
                    "tool_not_allowed",
                    f"{found.name} allows the tools {', '.join(t for t, _ in rule.tools)}; "
                    f"not {tool}",
                )
            )
        elif not scopes or set(scopes) - set(allowed):
            beyond = sorted(set(scopes) - set(allowed)) or ["(none asked)"]
            findings.append(
                _failed(
                    "scope_not_allowed",
                    f"{found.name} allows {tool} the scopes {', '.join(allowed)}; "
                    f"not {', '.join(beyond)}",
                )
            )
    if not task.tools:
        findings.append(_failed("task_required", "name at least one tool and its scopes"))
    return findings or [_passed(f"the task fits {found.name}: {task.describe()}")]


def _duration_rule(found: Entitlement, duration: int | None) -> _Finding:
    maximum = format_duration(found.max_duration)
    if duration is None:
        if found.default_duration is None:
            return _failed(
                "invalid_duration",
                f"no duration given and {found.name} has no default: give one of at most {maximum}",
            )
        return _passed(
            f"no duration given: the default {format_duration(found.default_duration)} applies, "
            f"within the maximum {maximum}"
        )
    if duration <= 0:
        return _failed("invalid_duration", "a duration must be longer than zero")
    if duration > found.max_duration:
        return _failed(
            "duration_too_long",
            f"{format_duration(duration)} is longer than the maximum {maximum} for {found.name}",
        )
    return _passed(f"{format_duration(duration)} within the maximum {maximum}")


def _reason_rule(found: Entitlement, reason: str | None) -> list[_Finding]:
    minimum = found.reason.min_length
    if reason is None or not minimum:
        return []
    if len(reason.strip()) < minimum:
        return [
            _failed(
                "reason_too_short",
                f"reason must be at least {minimum} characters (it has {len(reason.strip())})",
            )
        ]
    return [_passed(f"reason of at least {minimum} characters given")]


def _ticket_rule(found: Entitlement, ticket: str | None) -> list[_Finding]:
    pattern = found.reason.ticket
    if ticket is None or pattern is None:
        return []
    ticket = ticket.strip()
    if not ticket:
        return [
            _failed(
                "ticket_required",
                f"{found.name} needs a ticket matching {pattern.pattern}",
            )
        ]
    if not pattern.fullmatch(ticket):
        return [_failed("ticket_mismatch", f"ticket {ticket} does not match {pattern.pattern}")]
    return [_passed(f"ticket {ticket} matches {pattern.pattern}")]


def _schedule_rule(found: Entitlement, now: datetime, seconds: int | None) -> list[_Finding]:
    schedule = found.schedule
    if schedule is None:
        return []
    slot = schedule.slot_at(now)
    if slot is None:
        return [
            _failed(
                "outside_schedule",
                f"{found.name} may be active {schedule.describe()}; "
                f"it is {schedule.local_now(now)} there",
            )
        ]
    text = f"inside the schedule {schedule.describe()} (it is {schedule.local_now(now)} there)"
    if seconds and now + timedelta(seconds=seconds) > slot[1]:
        text += f"; the window will end at {schedule.local_now(slot[1])}, where the slot ends"
    return [_passed(text)]


def _limit_rule(found: Entitlement, active: int) -> list[_Finding]:
    limit = found.max_active
    if limit is None:
        return []
    if active >= limit:
        noun = "grant" if active == 1 else "grants"
        return [
            _failed(
                "limit_reached",
                f"you already hold {active} active or pending {found.name} {noun}; "
                f"the limit is {limit}",
            )
        ]
    return [_passed(f"{active} open {found.name} grants, below the limit of {limit}")]


def _approval_outcome(found: Entitlement, principal: Principal) -> tuple[int, str, str]:
    """(approvals required, the auto-approve condition that matched, the reason in words)."""
    rule = found.approval
    if rule is None:
        return 0, "", "no approval needed: issued at once"
    if principal.kind == "human":
        for group in rule.auto_approve_groups:
            if group in principal.groups:
                auto = f"requester is in auto-approve group {group}"
                return 0, auto, f"auto-approved: {auto}"
    return rule.required, "", f"needs {rule.describe()}"


def _break_glass_rule(found: Entitlement, principal: Principal) -> _Finding:
    glass = found.break_glass
    if glass is None:
        return _failed("no_break_glass", f"{found.name} has no break-glass path")
    if principal.kind != "human":
        return _failed("not_eligible", "break-glass is for people, never for agents")
    matched = [group for group in glass.groups if group in principal.groups]
    if not matched:
        return _failed(
            "not_eligible",
            f"break-glass for {found.name} is for members of {' or '.join(glass.groups)}; "
            f"{principal.display} is in {', '.join(principal.groups) or 'no groups'}",
        )
    return _passed(f"break-glass: requester is in {matched[0]}")


def _break_glass_duration_rule(found: Entitlement, glass: BreakGlassRule, seconds: int) -> _Finding:
    maximum = format_duration(glass.max_duration)
    if seconds <= 0:
        return _failed("invalid_duration", "a duration must be longer than zero")
    if seconds > glass.max_duration:
        return _failed(
            "duration_too_long",
            f"{format_duration(seconds)} is longer than the break-glass maximum {maximum} "
            f"for {found.name}",
        )
    return _passed(f"{format_duration(seconds)} is within the break-glass maximum {maximum}")


def _break_glass_reason_rule(found: Entitlement, glass: BreakGlassRule, reason: str) -> _Finding:
    needed = max(found.reason.min_length, glass.MIN_REASON)
    if len(reason.strip()) < needed:
        return _failed(
            "reason_too_short",
            f"break-glass needs a reason of at least {needed} characters: what is on fire",
        )
    return _passed("a reason is given")


def _extension_rules(found: Entitlement, extra: int) -> list[_Finding]:
    rule = found.extend
    if rule is None:
        return [_failed("extension_not_allowed", f"{found.name} windows cannot be extended")]
    if extra <= 0:
        return [_failed("invalid_duration", "an extension must be longer than zero")]
    if extra > rule.max_step:
        return [
            _failed(
                "extension_too_long",
                f"an extension of {found.name} adds at most {format_duration(rule.max_step)}; "
                f"{format_duration(extra)} asked",
            )
        ]
    step = format_duration(rule.max_step)
    return [_passed(f"{format_duration(extra)} within the step of {step}")]


def _extension_total_rule(found: Entitlement, start: datetime, new_end: datetime) -> list[_Finding]:
    rule = found.extend
    if rule is None:
        return []
    total = int((new_end - start).total_seconds())
    if total > rule.max_total:
        return [
            _failed(
                "extension_too_long",
                f"the window would last {format_duration(total)}; a {found.name} window lasts "
                f"at most {format_duration(rule.max_total)} from its start",
            )
        ]
    return [
        _passed(
            f"the whole window, {format_duration(total)}, within {format_duration(rule.max_total)}"
        )
    ]


def _extension_schedule_rule(found: Entitlement, now: datetime, new_end: datetime) -> list:
    schedule = found.schedule
    if schedule is None:
        return []
    slot = schedule.slot_at(now)
    if slot is None:
        return _schedule_rule(found, now, None)
    if new_end > slot[1]:
        return [
            _failed(
                "outside_schedule",
                f"{found.name} may be active {schedule.describe()}; an extended window may "
                f"not run past {schedule.local_now(slot[1])}, where this slot ends",
            )
        ]
    return [_passed(f"the extended window stays inside the schedule {schedule.describe()}")]


def _distinct_approvers(approvals: list[Approval], from_groups: tuple[str, ...]) -> list[Approval]:
    """Each person once (whichever of their identities approved), and only people who were in
    an approving group when they approved."""
    counted: list[Approval] = []
    for approval in approvals:
        if set(approval.groups) & set(from_groups) and not any(
            approval.person.is_same_as(other.person) for other in counted
        ):
            counted.append(approval)
    return counted


def _groups_without_an_approver(groups: tuple[str, ...], approvals: list[Approval]) -> list[str]:
    """The each_of groups left over when every group takes an approver of its own (one person
    cannot stand for two groups): a maximum matching by augmenting paths."""
    holder: dict[int, str] = {}  # approver index -> the group they stand for

    def place(group: str, tried: set[int]) -> bool:
        for index, approval in enumerate(approvals):
            if group in approval.groups and index not in tried:
                tried.add(index)
                if index not in holder or place(holder[index], tried):
                    holder[index] = group
                    return True
        return False

    return [group for group in groups if not place(group, set())]


def _aware(moment: datetime | None) -> datetime:
    if moment is None:
        return utcnow()
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
