"""Verification of a whole log or an exported range: the chain walk plus the signed checkpoints,
reporting the first bad sequence number and what is wrong there."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import GENESIS, Break, walk
from .signing import checkpoint_problem


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str = ""
    signed_size: int = 0  # the largest signed checkpoint the entries matched
    last_seq: int = 0

    def __str__(self) -> str:
        if not self.ok:
            return f"FAILED at seq {self.bad_seq}: {self.problem} ({self.checked} entries checked)"
        text = f"ok: {self.checked} entries, chain intact"
        if self.signed_size:
            text += f", signed through seq {self.signed_size}"
            if self.last_seq > self.signed_size:
                text += f" (seq {self.signed_size + 1} to {self.last_seq} not yet signed)"
        elif self.checked:
            text += ", no signed checkpoint covers it yet"
        return text


def verify(
    entries: Iterable[dict],
    checkpoints: Iterable[dict] = (),
    public_key: Ed25519PublicKey | None = None,
    first_seq: int = 1,
    first_prev: str | None = GENESIS,
) -> Verification:
    """Every checkpoint must verify under `public_key`; every entry must sit in its place, match
    its hash, link to the one before, and match the checkpoints at their sizes; and no checkpoint
    may name more entries than there are (a log cut short)."""
    breaks: list[Break] = []
    signed: dict[int, str] = {}
    for checkpoint in checkpoints:
        size = checkpoint["size"]
        problem = (
            checkpoint_problem(public_key, checkpoint)
            if public_key is not None
            else "there is no public key to check its signature"
        )
        if problem:
            breaks.append(Break(size, f"checkpoint of size {size}: {problem}"))
        else:
            signed[size] = checkpoint["head"]
    result = walk(entries, first_seq, first_prev, signed)
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
    if breaks:
        first = min(breaks, key=lambda b: b.seq)
        return Verification(False, result.checked, first.seq, first.problem)
    covered = [size for size in signed if size <= result.last_seq]
    return Verification(
        True, result.checked, signed_size=max(covered, default=0), last_seq=result.last_seq
    )
