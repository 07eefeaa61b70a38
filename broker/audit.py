"""The tamper-evident audit chain: canonical entries, each hashed over the previous entry's hash.
Pure functions on plain data; storing entries is the store's job, deciding what to log the use
cases' job."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = "0" * 64
ENTRY_FIELDS = ("seq", "at", "type", "actor", "grant_id", "data", "prev")


def canonical(value: object) -> bytes:
    """Sorted keys, no whitespace, UTF-8: the same entry always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical({k: entry[k] for k in ENTRY_FIELDS})).hexdigest()


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
    return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str = ""

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.checked} entries, chain intact"
        return f"FAILED at seq {self.bad_seq}: {self.problem} ({self.checked} entries checked)"


def verify(entries: Iterable[dict]) -> Verification:
    """Walk the chain in order and name the first entry that breaks it."""
    prev_seq, prev_hash, checked = 0, GENESIS, 0
    for entry in entries:
        seq = entry.get("seq")
        if seq != prev_seq + 1:
            problem = (
                f"expected seq {prev_seq + 1}, found {seq}: an entry was deleted, "
                "inserted or reordered"
            )
            return Verification(False, checked, prev_seq + 1, problem)
        if entry.get("prev") != prev_hash:
            return Verification(
                False,
                checked,
                seq,
                "prev does not match the hash of the entry "
                "before it: an entry before it was changed or removed",
            )
        if entry_hash(entry) != entry.get("hash"):
            return Verification(
                False, checked, seq, "content does not match its hash: the entry was edited"
            )
        prev_seq, prev_hash, checked = seq, entry["hash"], checked + 1
    return Verification(True, checked)
