"""Verification at the speed of hashing: each entry's canonical line, as the store composes it
from the columns, is hashed as it is, rather than decoded and encoded again. A line that matches
its hash vouches for every column it was composed from; one that does not (an entry written before
actor and data were stored canonical, or one edited since) is handed over decoded, and the chain
walk judges it as ever, so that every break is named in the same words."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

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


def quick_walk(
    lines: Iterable[Line],
    load: Callable[[int], dict | None],
    first_seq: int,
    first_prev: str | None,
    signed: dict[int, str],
    times_at: set[int],
    times: dict[int, str],
    wanted: set[int],
    hashes: dict[int, str],
) -> Walk | None:
    """The walk of an intact log in one tight loop: each entry in its place, its line (or, where
    the line is not the bytes it was sealed over, its decoded fields) matching its hash, linked
    to the one before, and the signed hashes at their sizes; the times and hashes `verify` asks
    for noted. None at the first thing amiss: the chain walk then reads the log again, slowly,
    to name it."""
    sha256 = hashlib.sha256
    expected, prev, at = first_seq, first_prev, ""
    for seq, at, linked, hash_, line in lines:
        if seq != expected or (prev is not None and linked != prev):
            return None
        if line is None or sha256(line.encode()).hexdigest() != hash_:
            entry = load(seq)
            if entry is None or entry["seq"] != seq or entry_hash(entry) != hash_:
                return None
        if seq in signed and signed[seq] != hash_:
            return None
        if seq in times_at:
            times[seq] = at
        if seq in wanted:
            hashes[seq] = hash_
        prev, expected = hash_, expected + 1
    if expected > first_seq:
        times[expected - 1] = at
    return Walk(checked=expected - first_seq, last_seq=expected - 1)
