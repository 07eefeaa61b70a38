"""Absence as evidence: a log that has been signing every `interval` seconds must show it. Names
the first place where checkpoints are missing: a checkpoint another one names as its predecessor,
entries that waited longer than the interval (plus a tolerance) for a checkpoint that does not
say why, entries still unsigned long after they were written. A log younger than one interval
owes nothing yet. Pure: plain entries' times and verified checkpoints in, one `Break` out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..models import parse_time
from .chain import Break


@dataclass(frozen=True)
class Cadence:
    """How often checkpoints are signed, and how late one may be before its absence counts."""

    interval: float = 60
    tolerance: float = 120

    @property
    def allowed(self) -> float:
        return self.interval + self.tolerance


def missing_checkpoints(
    times: dict[int, str],
    checkpoints: list[dict],
    cadence: Cadence,
    now: datetime,
    first_seq: int = 1,
    tail_open: bool = True,
) -> Break | None:
    """`times`: each entry's `at` by seq (first_seq to the last); `checkpoints`: the verified
    ones over them. `tail_open` False: the entries end before the log did (an exported range),
    so nobody can tell whether the last ones were signed later."""
    if not times:
        return None
    last_seq = max(times)
    sizes = {c["size"] for c in checkpoints}
    ordered = sorted(checkpoints, key=lambda c: (c["size"], c.get("at", "")))
    for checkpoint in ordered:
        previous = checkpoint.get("previous")
        if not isinstance(previous, int) or previous < first_seq:
            continue
        others = [c for c in ordered if c["size"] == previous and c is not checkpoint]
        if previous not in sizes or not others:
            return Break(
                previous,
                f"the checkpoint of size {previous} is missing: the checkpoint of size "
                f"{checkpoint['size']} (signed {checkpoint.get('at')}) names it as the one "
                "before it",
            )
    covered_to = first_seq - 1
    for checkpoint in ordered:
        size = checkpoint["size"]
        if size <= covered_to or size > last_seq:
            continue
        waited = _seconds(times[covered_to + 1], checkpoint.get("at"))
        linked = checkpoint.get("previous") == covered_to or (
            isinstance(checkpoint.get("previous"), int) and checkpoint["previous"] < first_seq
        )
        if not linked and (waited is None or waited > cadence.allowed):
            return Break(
                covered_to + 1,
                f"entries {covered_to + 1} to {size} waited {_span(waited)} for a checkpoint "
                f"(size {size}, signed {checkpoint.get('at')}), though one is signed every "
                f"{cadence.interval:g}s: the checkpoints between were deleted",
            )
        covered_to = size
    if tail_open and covered_to < last_seq:
        oldest = times[covered_to + 1]
        age = _seconds(oldest, now)
        if age is None or age > cadence.allowed:
            newest = (
                f"the newest checkpoint (size {covered_to}) is older than them"
                if covered_to >= first_seq
                else "no checkpoint covers any of them"
            )
            return Break(
                covered_to + 1,
                f"entries {covered_to + 1} to {last_seq} are not covered by a signed checkpoint, "
                f"though the oldest was written {oldest}, more than {cadence.allowed:g}s ago and "
                f"one is signed every {cadence.interval:g}s; {newest}: checkpoints were deleted, "
                "or the broker could not sign since (its /readyz check `checkpoints`)",
            )
    return None


def _seconds(start: object, end: object) -> float | None:
    try:
        first = parse_time(start) if isinstance(start, str) else None
        second = (
            end if isinstance(end, datetime) else parse_time(end) if isinstance(end, str) else None
        )
    except ValueError:
        return None
    if first is None or second is None:
        return None
    return (second - first).total_seconds()


def _span(seconds: float | None) -> str:
    return "an unknown time" if seconds is None else f"{seconds:.0f}s"
