"""The policy's data: which entitlements exist and the rules each carries (requesters, reason,
schedule, approval, extension, break-glass, its kind's options), as plain frozen dataclasses that
can describe themselves in words. Decides nothing, reads no file, imports nothing of the broker."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# --- the rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requesters:
    """Who may request. Any one rule admits. People are admitted by groups, email domains and
    claims, never by the agent list; agents only by the agent list, never by anything else."""

    groups: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (claim, accepted values)
    agents: tuple[str, ...] = ()

    def describe_people(self) -> str:
        parts = []
        if self.groups:
            parts.append(f"members of {', '.join(self.groups)}")
        if self.email_domains:
            parts.append(f"email addresses at {', '.join(self.email_domains)}")
        for claim, accepted in self.claims:
            parts.append(f"claim {claim} of {' or '.join(accepted)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class ReasonRule:
    min_length: int = 0
    ticket: re.Pattern | None = None  # when set, a ticket is required and must fullmatch


@dataclass(frozen=True)
class Schedule:
    """When a window may be active: slots that start on the listed days at `start` and end at
    `end` (minutes after local midnight; an end at or before the start runs into the next day)."""

    timezone: str
    days: tuple[int, ...]  # 0 is Monday
    start: int
    end: int

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def slot_at(self, moment: datetime) -> tuple[datetime, datetime] | None:
        """The slot holding this moment (UTC start and end), joined with the slots that follow
        it without a gap; None outside every slot."""
        local = moment.astimezone(self.zone)
        for day in (local.date() - timedelta(days=1), local.date()):
            if day.weekday() not in self.days:
                continue
            start, end = self._slot(day)
            if start <= moment < end:
                for _ in range(len(DAYS)):
                    following = end.astimezone(self.zone).date()
                    if following.weekday() not in self.days:
                        break
                    next_start, next_end = self._slot(following)
                    if next_start != end:
                        break
                    end = next_end
                return start, end
        return None

    def _slot(self, day: date) -> tuple[datetime, datetime]:
        end_day = day + timedelta(days=1) if self.end <= self.start or self.end == 1440 else day
        return self._at(day, self.start), self._at(end_day, self.end % 1440)

    def _at(self, day: date, minutes: int) -> datetime:
        local = datetime.combine(day, time(minutes // 60, minutes % 60), tzinfo=self.zone)
        return local.astimezone(UTC)

    def describe(self) -> str:
        return f"{_days_text(self.days)} {_clock(self.start)}-{_clock(self.end)} {self.timezone}"

    def local_now(self, moment: datetime) -> str:
        local = moment.astimezone(self.zone)
        return f"{DAYS[local.weekday()]} {local:%H:%M}"


@dataclass(frozen=True)
class ApprovalRule:
    required: int
    from_groups: tuple[str, ...]
    each_of: tuple[str, ...] = ()
    expires_after: int | None = None  # seconds a pending request waits; None: the broker default
    auto_approve_groups: tuple[str, ...] = ()

    def describe(self) -> str:
        noun = "approval" if self.required == 1 else "approvals"
        text = f"{self.required} {noun} from members of {' or '.join(self.from_groups)}"
        if self.each_of:
            text += f", at least one from each of {', '.join(self.each_of)}"
        return text


@dataclass(frozen=True)
class ExtendRule:
    max_step: int
    max_total: int


@dataclass(frozen=True)
class BreakGlassRule:
    """The emergency path: members of `groups` get the entitlement at once, without approval,
    ticket or schedule, for at most `max_duration`; `reviewers` must review it within
    `review_within` seconds of its start."""

    groups: tuple[str, ...]
    reviewers: tuple[str, ...]
    max_duration: int = 3600
    review_within: int = 86400

    MIN_REASON = 10  # an emergency still says what it is


@dataclass(frozen=True)
class Tool:
    """A tool the broker is the authorization server for (an OAuth protected resource): its
    resource URI (RFC 8707, the `aud` of its tokens), the scopes it understands, and how long
    one of its tokens may live at most (seconds)."""

    name: str
    resource: str
    scopes: tuple[str, ...]
    max_token_lifetime: int = 300
    # The OIDC provider's client (a client-credentials identity) that may introspect this tool's
    # tokens at /oauth/introspect; "" when none may.
    introspection_client: str = ""


@dataclass(frozen=True)
class TaskRule:
    """An entitlement whose grants are tasks: which agents (client ids) a task may be for, which
    tools with which scopes, and whether a listed agent may start its own task (CI) or a person
    admitted by the requesters must start it on their behalf."""

    agents: tuple[str, ...]
    tools: tuple[tuple[str, tuple[str, ...]], ...]  # (tool, the scopes a task may get)
    agent_may_start: bool = False

    def allowed_scopes(self, tool: str) -> tuple[str, ...] | None:
        """The scopes a task may get for `tool`; None when the rule does not name the tool."""
        return dict(self.tools).get(tool)

    def describe(self) -> str:
        used = "; ".join(f"{tool} ({', '.join(scopes)})" for tool, scopes in self.tools)
        starts = "the agent or a person starts it" if self.agent_may_start else "a person starts it"
        return f"a task for {', '.join(self.agents)} with {used}; {starts}"


@dataclass(frozen=True)
class Entitlement:
    name: str
    description: str
    backend: str
    vault_policies: tuple[str, ...]  # () for a kind that grants something else instead
    max_duration: int  # seconds
    default_duration: int | None = None
    max_active: int | None = None  # open (active or pending) grants per principal; None: no limit
    requesters: Requesters = Requesters()
    reason: ReasonRule = ReasonRule()
    schedule: Schedule | None = None
    approval: ApprovalRule | None = None
    extend: ExtendRule | None = None
    break_glass: BreakGlassRule | None = None
    task: TaskRule | None = None  # set for a task entitlement (backend "tool_task")
    # The kind's options, read from its table by its KindReader (broker/backends owns their type);
    # None for a kind without one.
    options: object | None = None

    @property
    def request_ttl(self) -> int | None:
        """How long a request may wait for approval, in seconds (None: the broker's default)."""
        return self.approval.expires_after if self.approval else None


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _days_text(days: tuple[int, ...]) -> str:
    """mon-fri, sat,sun, every day: runs of three or more days are written as a range."""
    if len(days) == len(DAYS):
        return "every day"
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    parts = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{DAYS[run[0]]}-{DAYS[run[-1]]}")
        else:
            parts.extend(DAYS[d] for d in run)
    return ",".join(parts)
