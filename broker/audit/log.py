"""The auditors' use cases over the stored log: sign checkpoints (and hand them to the witness),
verify the whole log, hold the grants table against it, show one grant's timeline with its chain
checked, export a bundle, look up whether a value appears. Reads the store through `AuditStore`;
writes only checkpoints and the witness's cursor, never an entry (entries are written by
`grants`, in the transaction of the change they record)."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..models import isoformat, utcnow
from . import chain, signing
from .absence import Cadence
from .bundle import write_bundle
from .lines import database_walk, sealed_entries
from .signing import FileKeySigner, Keyring, is_legacy
from .state import READS, GrantState, grant_problems
from .storage import AuditStore
from .transit_signing import CheckpointSigningFailed
from .verify import QuickWalk, Verification, as_keyring, verify
from .witness import KvWitness, WitnessError

log = logging.getLogger(__name__)

ADVANCE_STEP = 100_000  # entries verified per turn of the reaper thread, at most
WITNESS_CURSOR = "witness"  # the largest checkpoint size the KV witness holds
# Beyond this many grants the database could not vouch for, the state check reads every grant's
# entries in one pass rather than the suspects' by id.
SUSPECTS_READ_APART = 10_000


class CheckpointSigner(Protocol):
    """What signs checkpoints: OpenBao transit (`TransitCheckpointSigner`), or a v1 key file."""

    def sign(self, fields: dict) -> dict: ...

    def keyring(self) -> Keyring: ...

    def health(self) -> dict: ...


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
        signer: CheckpointSigner | Ed25519PrivateKey | None = None,
        checkpoint_copy: Path | None = None,
        clock: Callable[[], datetime] = utcnow,
        keyring: Keyring | None = None,
        cadence: Cadence | None = None,
        witness: KvWitness | None = None,
    ):
        """`signer`: what signs (an Ed25519 private key: a v1 key file, for old logs and tests);
        `keyring`: keys trusted besides the signer's own (the v1 key file found beside the
        database); `witness`: the KV path each checkpoint is also written to."""
        self.store = store
        self.checkpoint_copy = checkpoint_copy
        self.fingerprint_key = fingerprint_key
        self.signer: CheckpointSigner | None = (
            FileKeySigner(signer) if isinstance(signer, Ed25519PrivateKey) else signer
        )
        self.extra_keys = keyring or Keyring()
        self.clock = clock
        self.cadence = cadence or Cadence()
        self.witness = witness
        self._lock = threading.Lock()
        self._signed = (0, 0)  # (verified mark, largest checkpoint size within it) last read
        self.broken: Verification | None = None  # what `advance` last found, if broken
        self._newest: dict | None = None  # the newest checkpoint known (after a first read)
        self.signing_error = ""
        self.failing_since: datetime | None = None
        self.last_signed: datetime | None = None
        self.witness_error = ""

    def keyring(self) -> Keyring:
        """The keys checkpoints are checked against: the signer's (every transit version) and
        the v1 key file's. Raises CheckpointSigningFailed when transit's cannot be read."""
        own = self.signer.keyring() if self.signer is not None else Keyring()
        return own.merged(self.extra_keys)

    def published_keys(self) -> list[dict]:
        try:
            return self.keyring().as_json()
        except CheckpointSigningFailed:
            return self.extra_keys.as_json()

    @property
    def key_id(self) -> str:
        """The key signing now (the newest transit version), "" when unknown."""
        if self.signer is None:
            return ""
        try:
            return str(self.signer.health().get("key", ""))
        except CheckpointSigningFailed:
            return ""

    def checkpoint(self) -> dict | None:
        """Sign the log's size and head hash, if it grew since the last checkpoint (or the last
        one was signed by a v1 key file: the first transit checkpoint vouches for that key).
        A signer that fails is noted for /readyz and logged; the entries wait for the next
        checkpoint, which covers them all. Then the witness gets what it lacks."""
        if self.signer is None:
            return None
        head = self.store.audit_head()
        if head is None:
            return None
        newest = self._newest_checkpoint()
        migrating = (
            newest is not None and is_legacy(newest) and not isinstance(self.signer, FileKeySigner)
        )
        if newest is not None and newest["size"] >= head["seq"] and not migrating:
            self._witness_backlog()
            return None
        # A power loss must not take back entries that a signed checkpoint (and its copy
        # outside the database) already covers.
        self.store.make_durable()
        fields = {
            "size": head["seq"],
            "head": head["hash"],
            "at": self._now(),
            "previous": newest["size"] if newest else 0,
        }
        if migrating and newest is not None:
            fields["legacy_key_id"] = newest["key_id"]
        try:
            checkpoint = self.signer.sign(fields)
        except CheckpointSigningFailed as exc:
            if not self.signing_error:
                self.failing_since = self.clock()
            self.signing_error = str(exc)
            log.warning("signing an audit checkpoint failed (%s); the log keeps growing and "
                        "the next checkpoint covers it", exc)  # fmt: skip
            return None
        self.signing_error, self.failing_since = "", None
        self.last_signed = self.clock()
        self.store.add_checkpoint(checkpoint)
        if self.checkpoint_copy is not None:
            signing.append_checkpoint(self.checkpoint_copy, checkpoint)
        self._newest = checkpoint
        self._witness_backlog()
        return checkpoint

    def _newest_checkpoint(self) -> dict | None:
        if self._newest is None:
            every = self.checkpoints()
            self._newest = every[-1] if every else None
        later = self.store.checkpoints(first=self._newest["size"] if self._newest else 0)
        for checkpoint in later:
            if self._newest is None or checkpoint["size"] > self._newest["size"]:
                self._newest = checkpoint
        return self._newest

    def _witness_backlog(self) -> None:
        """Every checkpoint the witness lacks, in order; an outage is noted and tried again at
        the next checkpoint, never holding anything up."""
        if self.witness is None:
            return
        try:
            for checkpoint in self.store.checkpoints(first=self.store.cursor(WITNESS_CURSOR) + 1):
                if not is_legacy(checkpoint):
                    self.witness.record(checkpoint)
                self.store.set_cursor(WITNESS_CURSOR, checkpoint["size"])
        except WitnessError as exc:
            self.witness_error = str(exc)
            log.warning("witnessing audit checkpoints failed (%s); trying again", exc)
            return
        self.witness_error = ""

    def health(self) -> dict:
        """For /readyz, an alert and never a readiness failure: without signing the chain is
        still written (and signed later, all at once); `unsigned` says how far behind."""
        check: dict = {"ok": True}
        if self.signer is None:
            return {"ok": False, "error": "no checkpoint signer is configured"}
        check.update(self.signer.health())
        try:
            head = self.store.audit_head()
            newest = self._newest_checkpoint()
        except Exception as exc:
            return {
                **check,
                "ok": False,
                "error": f"reading the audit log failed: {type(exc).__name__}",
            }
        head_seq, signed = (head["seq"] if head else 0), (newest["size"] if newest else 0)
        check.update(head=head_seq, signed_size=signed, unsigned=max(0, head_seq - signed))
        if self.last_signed is not None:
            check["last_signed"] = isoformat(self.last_signed)
        if self.signing_error:
            check.update(ok=False, error=self.signing_error)
            if self.failing_since is not None:
                check["failing_since"] = isoformat(self.failing_since)
        if self.witness is not None:
            check["witness"] = {
                "name": self.witness.name,
                "witnessed_size": self.store.cursor(WITNESS_CURSOR),
                "ok": not self.witness_error,
                **({"error": self.witness_error} if self.witness_error else {}),
            }
            if self.witness_error:
                check["ok"] = False
        return check

    def checkpoints(self, first: int = 0, last: int | None = None) -> list[dict]:
        """The checkpoints in the database and the copies kept outside it, once each."""
        copies = signing.read_checkpoints(self.checkpoint_copy) if self.checkpoint_copy else []
        found: dict[tuple[int, str | None], dict] = {}
        for checkpoint in [*self.store.checkpoints(first, last), *copies]:
            if checkpoint.get("size", 0) >= first and (last is None or checkpoint["size"] <= last):
                found.setdefault((checkpoint["size"], checkpoint.get("signature")), checkpoint)
        # At one size, a v1 checkpoint before the transit one that took over from it.
        return sorted(found.values(), key=lambda c: (c["size"], not is_legacy(c)))

    def verify(
        self,
        keys: Keyring | Ed25519PublicKey | None = None,
        witnesses: Mapping[str, list[dict]] | None = None,
        absence: bool = False,
    ) -> Verification:
        """The whole log against every checkpoint, under `keys` (pinned) or ours; with
        `absence`, no checkpoint may be missing for the cadence; with `witnesses`, the log must
        agree with what each holds."""
        return verify(
            sealed_entries(self.store.audit_lines(), self.store.audit_entry),
            self.checkpoints(),
            as_keyring(keys) or self.keyring(),
            cadence=self.cadence if absence else None,
            now=self.clock(),
            witnesses=witnesses,
            quick=self._quick(0, chain.GENESIS),
        )

    def _quick(self, after: int, head: str, limit: int | None = None) -> QuickWalk:
        """The walk done in the database over the entries after seq `after` (lines.py)."""

        def run(*noting: Any) -> chain.Walk | None:
            return database_walk(self.store, after + 1, head, limit, *noting)

        return run

    def grant_problems(self) -> list[str]:
        """Each grant row that is not what its chain says (state.py), by grant and field. The
        database first vouches for the rows it can (Store.grants_unlike_chains); state.py
        reads and judges the rest, or, when they are many or the database could not read an
        entry, every grant."""
        kinds = [str(kind) for kind in sorted(READS)]
        suspects = self.store.grants_unlike_chains(self.fingerprint_key)
        if suspects is not None and len(suspects) <= SUSPECTS_READ_APART:
            if not suspects:
                return []
            return grant_problems(
                (GrantState(*row) for row in self.store.grant_states(suspects)),
                self.store.audit_grant_entries(kinds, suspects),
                self.store.approvals_of,
                self.fingerprint_key,
            )
        approvals = self.store.approvals_by_grant()
        return grant_problems(
            (GrantState(*row) for row in self.store.grant_states()),
            self.store.audit_grant_entries(kinds),
            lambda grant_id: approvals.get(grant_id, []),
            self.fingerprint_key,
        )

    def timeline(self, grant_id: str) -> Timeline:
        """One grant's entries, never verifying the whole log on a page load: the grant's own
        entries are checked (hash, and link to the entry before), and the whole log stands as
        far as the persisted mark `advance` moves in the background (`last_seq`), or as broken
        where `advance` last found it broken."""
        entries = list(self.store.audit_entries(grant_id))
        if self.broken is not None:
            return Timeline(entries, self.broken)
        for entry in entries:
            before = self.store.audit_entry(entry["seq"] - 1)
            link = before["hash"] if before else chain.GENESIS
            if chain.entry_hash(entry) != entry["hash"] or entry["prev"] != link:
                return Timeline(entries, self._around(entry["seq"]))
        mark, _ = self.store.verified_mark()
        return Timeline(entries, Verification(True, mark, signed_size=self._signed_through(mark),
                                              last_seq=mark))  # fmt: skip

    def _around(self, seq: int) -> Verification:
        """The chain walked from the entry before `seq` to the one after: the break in the words
        of a whole verification, for the price of three entries."""
        first = max(1, seq - 1)
        before = self.store.audit_entry(first - 1)
        entries = self.store.audit_entries(after=first - 1, limit=seq + 2 - first)
        return verify(entries, first_seq=first, first_prev=before["hash"] if before else None)

    def _signed_through(self, mark: int) -> int:
        """The largest checkpoint size within the verified mark (read on from the last answer)."""
        with self._lock:
            known_mark, known = self._signed
            if mark != known_mark:
                since = known if mark > known_mark else 0  # a mark set back: read from the start
                sizes = [c["size"] for c in self.store.checkpoints(first=since, last=mark)]
                self._signed = (mark, max(sizes, default=since))
            return self._signed[1]

    def checkpoint_and_advance(self) -> dict | None:
        """The reaper thread's audit work: sign a checkpoint, then move the verified mark on by
        at most ADVANCE_STEP entries (a long backlog is caught up over several turns, never
        holding up reaping for long). A failure to verify is logged; the pages show a break."""
        checkpoint = self.checkpoint()
        try:
            result = self.advance(ADVANCE_STEP)
        except Exception:
            log.exception("verifying the audit log in the background failed; trying again")
            return checkpoint
        if not result.ok:
            log.error("the audit log does not verify: %s", result)
        return checkpoint

    def advance(self, limit: int | None = None) -> Verification:
        """Verify what was appended since the persisted "verified through" mark and move the
        mark (the reaper thread's job, after each checkpoint; never a page's). A mark whose entry
        no longer has the hash it had means the log behind it was rewritten: verify it all
        again. A break leaves the mark, and is what the pages show until a later run passes."""
        with self._lock:
            seq, head = self.store.verified_mark()
            marked = self.store.audit_entry(seq) if seq else None
            if marked is None or marked["hash"] != head:
                seq, head = 0, chain.GENESIS
            lines = itertools.islice(self.store.audit_lines(after=seq), limit)
            result = verify(
                sealed_entries(lines, self.store.audit_entry),
                self.checkpoints(first=seq + 1, last=None if limit is None else seq + limit),
                self.keyring(),
                first_seq=seq + 1,
                first_prev=head,
                quick=self._quick(seq, head, limit),
            )
            self.broken = None if result.ok else result
            if result.ok and result.checked:
                last = self.store.audit_entry(result.last_seq)
                assert last is not None  # just verified, so it is there
                self.store.set_verified_mark(result.last_seq, last["hash"])
            return result

    def export(self, path: Path, fmt: str, since: str = "", until: str = "") -> dict:
        """A bundle of the entries written in [since, until) with the checkpoints over them."""
        first, last = self.store.audit_seq_range(since, until)
        entries = self.store.audit_entries(after=first - 1, limit=last - first + 1) if last else ()
        checkpoints = self.checkpoints(first, last) if last else []
        head = self.store.audit_head()
        about = {
            "since": since or None,
            "until": until or None,
            "exported_at": self._now(),
            "log_head_seq": head["seq"] if head else 0,
            "checkpoint_every": self.cadence.interval,
            "checkpoint_tolerance": self.cadence.tolerance,
        }
        keyring = self.keyring()
        # Every key version the checkpoints name, so the bundle verifies offline after any
        # number of rotations.
        used = {c.get("key_id") for c in checkpoints}
        needed = Keyring({kid: k for kid, k in keyring.keys.items() if kid in used})
        return write_bundle(path, fmt, entries, checkpoints, needed, about)

    def _now(self) -> str:
        return isoformat(self.clock())

    def lookup(self, value: str) -> list[dict]:
        """The entries that name `value` (a token accessor, lease id, database user name, SSH
        serial): the log holds only its HMAC, so this is how an auditor asks."""
        return list(
            self.store.audit_entries_containing(chain.fingerprint(self.fingerprint_key, value))
        )
