"""Verification at the speed of hashing: each entry's canonical line, as the store composes it
from the columns, is hashed as it is, rather than decoded and encoded again. A line that matches
its hash vouches for every column it was composed from; one that does not (an entry written before
actor and data were stored canonical, or one edited since) is handed over decoded, and the chain
walk judges it as ever, so that every break is named in the same words."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from .chain import SEALED

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
