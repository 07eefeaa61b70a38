"""The auditors' use cases over the stored log: sign checkpoints, verify the whole log, show one
grant's timeline with its chain checked, export a bundle, look up whether a value appears. Reads
the store through `AuditStore`; writes only checkpoints, never an entry (entries are written by
`grants`, in the transaction of the change they record)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..models import isoformat, utcnow
from . import chain, signing
from .bundle import write_bundle
from .storage import AuditStore
from .verify import Verification, verify


@dataclass(frozen=True)
class Timeline:
    """One grant's entries, and whether the chain holding them verifies."""

    entries: list[dict]
    verification: Verification


class AuditLog:
    def __init__(
        self,
        store: AuditStore,
        fingerprint_key: bytes,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
        checkpoint_copy: Path | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        self.store = store
        self.checkpoint_copy = checkpoint_copy
        self.fingerprint_key = fingerprint_key
        self.signing_key = signing_key
        self.public_key = public_key or (signing_key.public_key() if signing_key else None)
        self.clock = clock
        self._lock = threading.Lock()
        self._verified = (0, chain.GENESIS, 0)  # (seq, hash, signed size) checked so far

    @property
    def key_id(self) -> str:
        return signing.key_id(self.public_key) if self.public_key else ""

    @property
    def public_key_pem(self) -> str:
        return signing.public_pem(self.public_key) if self.public_key else ""

    def checkpoint(self) -> dict | None:
        """Sign the log's size and head hash, if it grew since the last checkpoint."""
        if self.signing_key is None:
            return None
        head = self.store.audit_head()
        latest = self.store.checkpoints(first=head["seq"]) if head else [{}]
        if head is None or latest:
            return None
        # A power loss must not take back entries that a signed checkpoint (and its copy
        # outside the database) already covers.
        self.store.make_durable()
        checkpoint = signing.sign_checkpoint(
            self.signing_key, head["seq"], head["hash"], self._now()
        )
        self.store.add_checkpoint(checkpoint)
        if self.checkpoint_copy is not None:
            signing.append_checkpoint(self.checkpoint_copy, checkpoint)
        return checkpoint

    def checkpoints(self, first: int = 0, last: int | None = None) -> list[dict]:
        """The checkpoints in the database and the copies kept outside it, once each."""
        copies = signing.read_checkpoints(self.checkpoint_copy) if self.checkpoint_copy else []
        found: dict[tuple[int, str | None], dict] = {}
        for checkpoint in [*self.store.checkpoints(first, last), *copies]:
            if checkpoint.get("size", 0) >= first and (last is None or checkpoint["size"] <= last):
                found.setdefault((checkpoint["size"], checkpoint.get("signature")), checkpoint)
        return sorted(found.values(), key=lambda c: c["size"])

    def verify(self, public_key: Ed25519PublicKey | None = None) -> Verification:
        """The whole log against every checkpoint, under `public_key` (a pinned key) or ours."""
        return verify(self.store.audit_entries(), self.checkpoints(), public_key or self.public_key)

    def timeline(self, grant_id: str) -> Timeline:
        """One grant's entries. The log is verified in full once, then only what was appended
        since; the grant's own entries are checked again each time, hash and link."""
        entries = list(self.store.audit_entries(grant_id))
        verification = self._verify_since_last()
        if verification.ok:
            verification = self._recheck(entries, verification)
        return Timeline(entries, verification)

    def _verify_since_last(self) -> Verification:
        with self._lock:
            seq, head, signed_size = self._verified
            checkpoints = self.checkpoints(first=seq + 1)
            result = verify(
                self.store.audit_entries(after=seq),
                checkpoints,
                self.public_key,
                first_seq=seq + 1,
                first_prev=head,
            )
            if not result.ok:
                return result
            if result.checked:
                last = self.store.audit_entry(result.last_seq)
                assert last is not None  # just verified, so it is there
                signed_size = result.signed_size or signed_size
                self._verified = (result.last_seq, last["hash"], signed_size)
            total = self._verified[0]
            return Verification(True, total, signed_size=signed_size, last_seq=total)

    def _recheck(self, entries: list[dict], whole: Verification) -> Verification:
        for entry in entries:
            before = self.store.audit_entry(entry["seq"] - 1)
            link = before["hash"] if before else chain.GENESIS
            if chain.entry_hash(entry) != entry["hash"] or entry["prev"] != link:
                return self.verify()
        return whole

    def export(self, path: Path, fmt: str, since: str = "", until: str = "") -> dict:
        """A bundle of the entries written in [since, until) with the checkpoints over them."""
        first, last = self.store.audit_seq_range(since, until)
        entries = self.store.audit_entries(after=first - 1, limit=last - first + 1) if last else ()
        checkpoints = self.checkpoints(first, last) if last else []
        about = {"since": since or None, "until": until or None, "exported_at": self._now()}
        return write_bundle(path, fmt, entries, checkpoints, self.public_key_pem, about)

    def _now(self) -> str:
        return isoformat(self.clock())

    def lookup(self, value: str) -> list[dict]:
        """The entries that name `value` (a token accessor, lease id, database user name, SSH
        serial): the log holds only its HMAC, so this is how an auditor asks."""
        return list(
            self.store.audit_entries_containing(chain.fingerprint(self.fingerprint_key, value))
        )
