"""The auditors' dashboard figures, counted from the grants and their audit entries of the last
days: grants per day by entitlement, time to approve, break-glass uses, revocation lag (from the
window's end to the removal verified) and failed removals. Reads only; no Flask, no drawing
(`web/charts.py` draws these as SVG)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta

from ..models import Grant, isoformat, parse_time
from .search import AuditSearch, GrantFilter
from .storage import AuditStore

DAYS = 14  # the days it counts, up to today


def counted(audit_search: AuditSearch, days: int, now: datetime) -> Figures:
    """The figures of the `days` days up to `now`: the grants created since, and their chains."""
    grants = list(audit_search.iter_grants(GrantFilter(since=since_for(now, days))))
    return figures(audit_search.store, grants, now, days)


@dataclass
class Figures:
    days: list[str]  # YYYY-MM-DD, oldest first
    grants_per_day: dict[str, list[int]] = field(default_factory=dict)  # entitlement -> per day
    break_glass_per_day: list[int] = field(default_factory=list)
    failed_removals_per_day: list[int] = field(default_factory=list)
    approve_seconds: list[int] = field(default_factory=list)  # request -> last approval
    revocation_lag_seconds: list[int] = field(default_factory=list)  # window end -> verified
    grants: int = 0
    counted_at: str = ""  # when these figures were counted


# The entries the figures are counted from.
COUNTED = ("request", "approval", "release", "expire", "verify", "revoke_failed")


def figures(store: AuditStore, grants: list[Grant], now: datetime, days: int = 14) -> Figures:
    """The figures over `grants` (those created in the last `days` days up to `now`), their
    entries read in one pass over the log since the window's first day."""
    start = (now - timedelta(days=days - 1)).date()
    labels = [(start + timedelta(days=i)).isoformat() for i in range(days)]
    index = {day: i for i, day in enumerate(labels)}
    per_entitlement: dict[str, list[int]] = defaultdict(lambda: [0] * days)
    result = Figures(
        labels,
        break_glass_per_day=[0] * days,
        failed_removals_per_day=[0] * days,
        counted_at=isoformat(now),
    )
    counted = {}
    for grant in grants:
        day = grant.created_at[:10]
        if day not in index:
            continue
        counted[grant.id] = Timeline()
        result.grants += 1
        per_entitlement[grant.entitlement][index[day]] += 1
        if grant.break_glass:
            result.break_glass_per_day[index[day]] += 1
    # A day early: an entry's time and its grant's creation come from two readings of the clock.
    since = isoformat(datetime.combine(start - timedelta(days=1), time(), tzinfo=UTC))
    for grant_id, kind, at, data in store.audit_grant_times(COUNTED, since):
        timeline = counted.get(grant_id)
        if timeline is not None:
            timeline.add(kind, at, data)
    for timeline in counted.values():
        timeline.count(result, index)
    ranked = Counter({name: sum(counts) for name, counts in per_entitlement.items()})
    result.grants_per_day = {name: per_entitlement[name] for name, _ in ranked.most_common()}
    return result


@dataclass
class Timeline:
    """The times in one grant's chain that the figures need."""

    requested: str = ""
    last_approval: str = ""
    ended: str = ""  # the first release or expiry
    last_verified_gone: str = ""
    failed_removals: list[str] = field(default_factory=list)

    def add(self, kind: str, at: str, data: str | None) -> None:
        if kind == "request":
            self.requested = self.requested or at
        elif kind == "approval":
            self.last_approval = at
        elif kind in ("release", "expire"):
            self.ended = self.ended or at
        elif kind == "verify":
            if (json.loads(data) if data else {}).get("gone"):
                self.last_verified_gone = at
        elif kind == "revoke_failed":
            self.failed_removals.append(at)

    def count(self, result: Figures, index: dict[str, int]) -> None:
        if self.requested and self.last_approval:
            result.approve_seconds.append(_seconds(self.requested, self.last_approval))
        if self.ended and self.last_verified_gone:
            lag = _seconds(self.ended, self.last_verified_gone)
            result.revocation_lag_seconds.append(max(0, lag))
        for at in self.failed_removals:
            if at[:10] in index:
                result.failed_removals_per_day[index[at[:10]]] += 1


def _seconds(since: str, until: str) -> int:
    return int((parse_time(until) - parse_time(since)).total_seconds())


def since_for(now: datetime, days: int) -> str:
    """The `since` filter (UTC, midnight) of the window the dashboard counts."""
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return isoformat(start)
