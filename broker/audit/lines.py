"""Verification at the speed of hashing: each entry's canonical line, as the store composes it
from the columns, is hashed as it is, rather than decoded and encoded again, and inside the
database (`database_walk`): only the entries it cannot vouch for are read out. A line that
matches its hash vouches for every column it was composed from; one that does not (an entry
written before actor and data were stored canonical, or one edited since) is handed over
decoded, and the chain walk judges it as ever, so that every break is named in the same words."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .chain import SEALED, Walk, entry_hash

Line = tuple[int, str, str, str, str | None]  # seq, at, prev, hash, canonical line


def sealed_entries(lines: Iterable[Line], load: Callable[[int], dict | None]) -> Iterator[dict]:
    """Each entry as the chain walk needs it: seq, at, prev and hash, marked sealed when its line
    hashes to its hash; else the whole entry, decoded (`load`), for the walk to check."""
    sha256 = hashlib.sha256
    for seq, at, prev, hash_, line in lines:
        if line is not None and sha256(line.encode()).hexdigest() == hash_:
            yield {"seq": seq, "at": at, "prev": prev, "hash": hash_, SEALED: True}
        else:
            yield load(seq) or {"seq": seq, "at": at, "prev": prev, "hash": hash_}


class StoredChain(Protocol):
    """What the walk in the database reads: the store's side of `database_walk`."""

    def audit_span(self, after: int = 0, last: int | None = None) -> tuple[int, int]: ...

    def audit_suspects(
        self, after: int, last: int
    ) -> Iterator[tuple[int, str, str, bool, bool]]: ...

    def audit_marks(self, seqs: Iterable[int]) -> dict[int, tuple[str, str]]: ...

    def audit_entry(self, seq: int) -> dict | None: ...


def database_walk(
    store: StoredChain,
    first_seq: int,
    first_prev: str | None,
    limit: int | None,
    signed: dict[int, str],
    times_at: set[int],
    times: dict[int, str],
    wanted: set[int],
    hashes: dict[int, str],
) -> Walk | None:
    """The walk of an intact log with the hashing and linking done where the rows are (at most
    `limit` entries from `first_seq`): no seq missing (as many entries as the range is long),
    each entry's line hashing to its hash (or, where the line is not the bytes it was sealed
    over, its decoded fields) and linked to the one before, the first to `first_prev` (None:
    to anything), and the signed hashes at their sizes; the times and hashes `verify` asks for
    noted. None at the first thing amiss: the chain walk then reads the log, slowly, to name
    it."""
    after = first_seq - 1
    count, top = store.audit_span(after, None if limit is None else after + limit)
    if top != after + count:
        return None  # a seq missing (deleted) or out of place
    for seq, prev, hash_, sealed, linked in store.audit_suspects(after, top) if count else ():
        if seq == first_seq:
            linked = first_prev is None or prev == first_prev
        if not linked:
            return None
        if not sealed:
            entry = store.audit_entry(seq)
            if entry is None or entry["seq"] != seq or entry_hash(entry) != hash_:
                return None
    if not count:
        return Walk(checked=0, last_seq=after)
    noted = {seq for seq in (*signed, *times_at, *wanted) if first_seq <= seq <= top}
    marks = store.audit_marks(noted | {top})
    for seq in noted:
        if seq not in marks or (seq in signed and signed[seq] != marks[seq][1]):
            return None
        if seq in times_at:
            times[seq] = marks[seq][0]
        if seq in wanted:
            hashes[seq] = marks[seq][1]
    times[top] = marks[top][0]
    return Walk(checked=count, last_seq=top)
