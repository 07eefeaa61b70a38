"""The tamper-evident chain: canonical entries, each hashed over the previous entry's hash, and
the walk that names the first entry that breaks it. Pure functions on plain data; storing entries
is the store's job, deciding what to log the use cases' job."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

GENESIS = "0" * 64
ENTRY_FIELDS = ("seq", "at", "type", "actor", "grant_id", "data", "prev")
# Set (by lines.py, never from stored data) on an entry whose stored canonical line was found to
# hash to its hash: its content is checked, and only its place and link are left to the walk.
SEALED = "_sealed"
FINGERPRINT_PREFIX = "hmac-sha256:"


def canonical(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (RFC 8785 style): the same entry always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical({k: entry.get(k) for k in ENTRY_FIELDS})).hexdigest()


def seal(
    prev: dict | None, at: str, type_: str, actor: dict, grant_id: str | None, data: dict
) -> dict:
    """The next entry after `prev` (None for the first), with its hash."""
    entry = {
        "seq": prev["seq"] + 1 if prev else 1,
        "at": at,
        "type": type_,
        "actor": actor,
        "grant_id": grant_id,
        "data": data,
        "prev": prev["hash"] if prev else GENESIS,
    }
    entry["hash"] = entry_hash(entry)
    return entry


def fingerprint(key: bytes, value: str) -> str:
    """An HMAC of an identifier (token accessor, lease id): lets an auditor match a known value
    against the log without the log holding it."""
    return FINGERPRINT_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Break:
    """Where the chain breaks and why, in words an auditor can act on."""

    seq: int
    problem: str


class _Peekable:
    def __init__(self, items: Iterable[dict]):
        self._items: Iterator[dict] = iter(items)
        self._next: list[dict] = []

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> dict:
        return self._next.pop() if self._next else next(self._items)

    def peek(self) -> dict | None:
        if not self._next:
            try:
                self._next.append(next(self._items))
            except StopIteration:
                return None
        return self._next[0]


def _sealed_as(entry: dict | None, seq: int) -> bool:
    """Whether the entry's hash was computed for sequence number `seq` (it was moved)."""
    return entry is not None and entry_hash(dict(entry, seq=seq)) == entry.get("hash")


@dataclass
class Walk:
    """The result of walking a run of entries: how far it got, and the first break (None:
    intact)."""

    checked: int = 0
    last_seq: int = 0
    broken: Break | None = None


def walk(
    entries: Iterable[dict],
    first_seq: int = 1,
    first_prev: str | None = GENESIS,
    signed: dict | None = None,
) -> Walk:
    """Check each entry's sequence number, hash and link to the one before it, and that the
    entries at signed sizes have the signed hashes. `first_prev` None accepts whatever the first
    entry links to (an exported range starts mid-log)."""
    signed = signed or {}
    result = Walk(last_seq=first_seq - 1)
    prev_hash, prev2_hash = first_prev, None
    entries = _Peekable(entries)
    for entry in entries:
        expected = result.last_seq + 1
        broken = _misplaced(entry, expected, entries.peek()) or _altered(
            entry, expected, entries.peek(), prev_hash, prev2_hash
        )
        if broken is None and expected in signed and entry["hash"] != signed[expected]:
            broken = Break(
                expected,
                f"entry {expected} is not the one the signed checkpoint of size {expected} "
                "names: the log was rewritten up to here",
            )
        if broken is not None:
            result.broken = broken
            return result
        prev2_hash, prev_hash = prev_hash, entry["hash"]
        result.checked, result.last_seq = result.checked + 1, expected
    return result


def _misplaced(entry: dict, expected: int, following: dict | None) -> Break | None:
    """A sequence number out of place: deleted, inserted or reordered entries."""
    seq = entry.get("seq")
    if seq == expected:
        return None
    if seq == expected + 1 and following is not None and following.get("seq") == expected:
        return Break(expected, f"entries {expected} and {expected + 1} are out of order: reordered")
    if isinstance(seq, int) and seq > expected:
        missing = str(expected) if seq == expected + 1 else f"{expected} to {seq - 1}"
        return Break(expected, f"entry {missing} is missing: deleted")
    if seq == expected - 1:
        return Break(seq, f"two entries claim seq {seq}: one was inserted")
    return Break(expected, f"found seq {seq!r} where {expected} belongs: inserted or reordered")


def _altered(
    entry: dict, seq: int, following: dict | None, prev_hash: str | None, prev2_hash: str | None
) -> Break | None:
    """Content that does not match its hash, or a link that does not match the entry before."""
    if not entry.get(SEALED) and entry_hash(entry) != entry.get("hash"):
        if _sealed_as(entry, seq + 1):
            if _sealed_as(following, seq):
                return Break(seq, f"entries {seq} and {seq + 1} were swapped: reordered")
            return Break(seq, f"entry {seq} was deleted and the entries after it renumbered")
        if _sealed_as(entry, seq - 1):
            return Break(seq - 1, f"entry {seq - 1} was inserted: the entries after it renumbered")
        if _sealed_as(following, seq):
            return Break(seq, f"entry {seq} was inserted: the entries after it renumbered")
        return Break(seq, f"entry {seq} was edited: its content does not match its hash")
    if prev_hash is not None and entry.get("prev") != prev_hash:
        if prev2_hash is not None and entry.get("prev") == prev2_hash:
            return Break(seq - 1, f"entry {seq - 1} was inserted: entry {seq} links past it")
        return Break(
            seq - 1,
            f"entry {seq} does not link to entry {seq - 1}: entry {seq - 1} was rewritten "
            "(its hash recomputed) or an entry between them removed",
        )
    return None
