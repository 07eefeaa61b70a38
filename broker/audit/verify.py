"""Verification of a whole log or an exported range: the chain walk, the signed checkpoints
under a `Keyring`, and, when asked, what is absent (missing checkpoints) and what witnesses hold.
Reports the first bad sequence number and what is wrong there, and any further findings."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .absence import Cadence, missing_checkpoints
from .chain import GENESIS, Break, Walk, walk
from .signing import Keyring, vouched_file_keys
from .witness import disagreement

# (signed hashes by size, the seqs whose times to note, times, seqs whose hashes to note, hashes)
QuickWalk = Callable[
    [dict[int, str], set[int], dict[int, str], set[int], dict[int, str]], Walk | None
]


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str = ""
    signed_size: int = 0  # the largest signed checkpoint the entries matched
    last_seq: int = 0
    also: tuple[str, ...] = ()  # further findings, after the first

    def __str__(self) -> str:
        if not self.ok:
            where = f" at seq {self.bad_seq}" if self.bad_seq is not None else ""
            text = f"FAILED{where}: {self.problem} ({self.checked} entries checked)"
            return "\n".join([text, *(f"  also: {finding}" for finding in self.also)])
        text = f"ok: {self.checked} entries, chain intact"
        if self.signed_size:
            text += f", signed through seq {self.signed_size}"
            if self.last_seq > self.signed_size:
                text += f" (seq {self.signed_size + 1} to {self.last_seq} not yet signed)"
        elif self.checked:
            text += ", no signed checkpoint covers it yet"
        return text

    def failed_with(self, problems: list[str]) -> Verification:
        """This result, failed by findings that name no sequence number (the grants table)."""
        if not problems:
            return self
        if not self.ok:
            return Verification(False, self.checked, self.bad_seq, self.problem, self.signed_size,
                                self.last_seq, (*self.also, *problems))  # fmt: skip
        return Verification(False, self.checked, None, problems[0], self.signed_size,
                            self.last_seq, tuple(problems[1:]))  # fmt: skip


def as_keyring(key: Keyring | Ed25519PublicKey | None) -> Keyring | None:
    """A single Ed25519 key (a v1 key file's, or one an auditor pinned) as a keyring."""
    if key is None or isinstance(key, Keyring):
        return key
    return Keyring.of_file_key(key, pinned=True)


def verify(
    entries: Iterable[dict],
    checkpoints: Iterable[dict] = (),
    keys: Keyring | Ed25519PublicKey | None = None,
    first_seq: int = 1,
    first_prev: str | None = GENESIS,
    cadence: Cadence | None = None,
    now: datetime | None = None,
    tail_open: bool = True,
    witnesses: Mapping[str, list[dict]] | None = None,
    quick: QuickWalk | None = None,
) -> Verification:
    """Every checkpoint must verify under `keys`; every entry must sit in its place, match its
    hash, link to the one before, and match the checkpoints at their sizes; no checkpoint may
    name more entries than there are (a log cut short). With a `cadence` (and `now`), no
    checkpoint may be missing (absence.py); with `witnesses`, the log must agree with each.
    `quick`: a walk that vouches for an intact log faster (lines.py), or gives up (None), and
    then `entries` are walked (read only then)."""
    keyring = as_keyring(keys)
    checkpoints = list(checkpoints)
    witnesses = witnesses or {}
    breaks: list[Break] = []
    signed: dict[int, str] = {}
    good: list[dict] = []
    vouched = vouched_file_keys(keyring, checkpoints) if keyring is not None else {}
    for checkpoint in checkpoints:
        size = checkpoint["size"]
        problem = (
            keyring.problem(checkpoint, vouched)
            if keyring is not None
            else "there is no public key to check its signature"
        )
        if problem:
            breaks.append(Break(size, f"checkpoint of size {size}: {problem}"))
        else:
            signed[size] = checkpoint["head"]
            good.append(checkpoint)
    times: dict[int, str] = {}
    wanted = {c["size"] for found in witnesses.values() for c in found}
    hashes: dict[int, str] = {}
    times_at = {first_seq, *(size + 1 for size in signed)}  # what absence.py reads
    result = quick(signed, times_at, times, wanted, hashes) if quick is not None else None
    if result is None:
        times.clear()
        hashes.clear()
        result = walk(_noting(entries, times, wanted, hashes), first_seq, first_prev, signed)
    if result.broken:
        breaks.append(result.broken)
    beyond = [size for size in signed if size > result.last_seq]
    if not result.broken and beyond:
        breaks.append(
            Break(
                result.last_seq + 1,
                f"the log ends at seq {result.last_seq} but a signed checkpoint covers "
                f"{max(beyond)} entries: it was cut short",
            )
        )
    findings = sorted(breaks, key=lambda b: b.seq)
    if not findings:
        for source, found in witnesses.items():
            differs = disagreement(found, checkpoints, result.last_seq, hashes.get, keyring, source)
            if differs is not None:
                findings.append(differs)
        if cadence is not None and now is not None:
            times = {seq: at for seq, at in times.items() if seq <= result.last_seq}
            absent = missing_checkpoints(times, good, cadence, now, first_seq, tail_open)
            if absent is not None:
                findings.append(absent)
    if findings:
        first, rest = findings[0], findings[1:]
        return Verification(False, result.checked, first.seq, first.problem,
                            also=tuple(f"at seq {b.seq}: {b.problem}" for b in rest))  # fmt: skip
    covered = [size for size in signed if size <= result.last_seq]
    return Verification(
        True, result.checked, signed_size=max(covered, default=0), last_seq=result.last_seq
    )


def _noting(
    entries: Iterable[dict], times: dict[int, str], wanted: set[int], hashes: dict[int, str]
) -> Iterator[dict]:
    """The entries, passed on, noting each one's time (for absence) and the hashes at the
    sizes witnesses hold."""
    for entry in entries:
        seq = entry.get("seq")
        if isinstance(seq, int):
            times[seq] = str(entry.get("at"))
            if seq in wanted:
                hashes[seq] = str(entry.get("hash"))
        yield entry
