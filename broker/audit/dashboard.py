"""The auditors' dashboard figures, counted from the grants and their audit entries of the last
days: grants per day by entitlement, time to approve, break-glass uses, revocation lag (from the
window's end to the removal verified) and failed removals. Reads only; no Flask, no drawing
(`web/charts.py` draws these as SVG)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..models import Grant, isoformat, parse_time
from .storage import AuditStore


@dataclass
class Figures:
    days: list[str]  # YYYY-MM-DD, oldest first
    grants_per_day: dict[str, list[int]] = field(default_factory=dict)  # entitlement -> per day
    break_glass_per_day: list[int] = field(default_factory=list)
    failed_removals_per_day: list[int] = field(default_factory=list)
    approve_seconds: list[int] = field(default_factory=list)  # request -> last approval
    revocation_lag_seconds: list[int] = field(default_factory=list)  # window end -> verified
    grants: int = 0


def figures(store: AuditStore, grants: list[Grant], now: datetime, days: int = 14) -> Figures:
    """The figures over `grants` (those created in the last `days` days up to `now`)."""
    start = (now - timedelta(days=days - 1)).date()
    labels = [(start + timedelta(days=i)).isoformat() for i in range(days)]
    index = {day: i for i, day in enumerate(labels)}
    per_entitlement: dict[str, list[int]] = defaultdict(lambda: [0] * days)
    result = Figures(labels, break_glass_per_day=[0] * days, failed_removals_per_day=[0] * days)
    for grant in grants:
        day = grant.created_at[:10]
        if day not in index:
            continue
        result.grants += 1
        per_entitlement[grant.entitlement][index[day]] += 1
        if grant.break_glass:
            result.break_glass_per_day[index[day]] += 1
        _from_entries(result, grant, list(store.audit_entries(grant.id)), index)
    ranked = Counter({name: sum(counts) for name, counts in per_entitlement.items()})
    result.grants_per_day = {name: per_entitlement[name] for name, _ in ranked.most_common()}
    return result


def _from_entries(result: Figures, grant: Grant, entries: list[dict], index: dict) -> None:
    requested = next((e["at"] for e in entries if e["type"] == "request"), "")
    approvals = [e["at"] for e in entries if e["type"] == "approval"]
    if requested and approvals:
        result.approve_seconds.append(_seconds(requested, approvals[-1]))
    ended = next((e["at"] for e in entries if e["type"] in ("release", "expire")), "")
    verified = [
        e["at"] for e in entries if e["type"] == "verify" and (e.get("data") or {}).get("gone")
    ]
    if ended and verified:
        result.revocation_lag_seconds.append(max(0, _seconds(ended, verified[-1])))
    for entry in entries:
        if entry["type"] == "revoke_failed" and entry["at"][:10] in index:
            result.failed_removals_per_day[index[entry["at"][:10]]] += 1


def _seconds(since: str, until: str) -> int:
    return int((parse_time(until) - parse_time(since)).total_seconds())


def since_for(now: datetime, days: int) -> str:
    """The `since` filter (UTC, midnight) of the window the dashboard counts."""
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return isoformat(start)
