"""What the audit package reads and writes through the broker's store, as one Protocol: the store
(`broker.store.Store`) satisfies it by its shape. Never imports the store, so that audit stays
below it (the store imports the chain to seal entries)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from typing import Protocol, TypedDict, Unpack

from ..models import Approval, Grant


class GrantFilters(TypedDict, total=False):
    """The filters of `search_grants`, as `iter_grants` passes them on."""

    person: str
    entitlement: str
    status: str
    break_glass: bool | None
    since: str
    until: str


class AuditStore(Protocol):
    # The log, in sequence order, and the signed checkpoints over it.
    def audit_entries(
        self, grant_id: str | None = None, after: int = 0, limit: int = -1
    ) -> Iterator[dict]: ...

    # (seq, at, prev, hash, canonical line composed from the columns): what verification hashes.
    def audit_lines(self, after: int = 0) -> Iterator[tuple[int, str, str, str, str | None]]: ...

    def audit_entries_containing(self, text: str) -> Iterator[dict]: ...

    # The chain hashed and linked in the database (lines.database_walk): how many entries in a
    # range, those it cannot vouch for, and (at, hash) at the seqs a verification notes.
    def audit_span(self, after: int = 0, last: int | None = None) -> tuple[int, int]: ...

    def audit_suspects(
        self, after: int, last: int
    ) -> Iterator[tuple[int, str, str, bool, bool]]: ...

    def audit_marks(self, seqs: Iterable[int]) -> dict[int, tuple[str, str]]: ...

    # (grant_id, type, actor, data) of the grants' entries of `kinds` (of all grants, or of
    # `grant_ids`), actor and data as stored (JSON text), and (id, status, window_end, handle)
    # of the grants: the state check's reads. The ids of the grants whose row the database
    # cannot vouch for against their chain (None: it could not read every entry): its first
    # pass.
    def audit_grant_entries(
        self, kinds: Collection[str], grant_ids: Collection[str] | None = None
    ) -> Iterator[tuple[str | None, str, str | None, str | None]]: ...

    def grant_states(
        self, grant_ids: Collection[str] | None = None
    ) -> Iterator[tuple[str, str, str, str]]: ...

    def grants_unlike_chains(self, fingerprint_key: bytes) -> list[str] | None: ...

    # (grant_id, type, at, data) of the grants' entries of `kinds` since a time: the dashboard's.
    def audit_grant_times(
        self, kinds: Collection[str], since: str
    ) -> Iterator[tuple[str, str, str, str | None]]: ...

    def audit_entry(self, seq: int) -> dict | None: ...

    def audit_head(self) -> dict | None: ...

    def audit_seq_range(self, since: str = "", until: str = "") -> tuple[int, int]: ...

    def add_checkpoint(self, checkpoint: dict) -> None: ...

    # Before a checkpoint is signed or an entry leaves the machine: on disk, not only committed.
    def make_durable(self) -> None: ...

    def checkpoints(self, first: int = 0, last: int | None = None) -> list[dict]: ...

    # A consumer's position in the log (the forwarder's).
    def cursor(self, name: str) -> int: ...

    def set_cursor(self, name: str, seq: int) -> None: ...

    # How far the whole log was verified (seq, and the hash there), for the auditor pages.
    def verified_mark(self) -> tuple[int, str]: ...

    def set_verified_mark(self, seq: int, hash_: str) -> None: ...

    # The grants an auditor searches, and each one's approvals.
    def get_grant(self, grant_id: str) -> Grant | None: ...

    def approvals_of(self, grant_id: str) -> list[Approval]: ...

    def approvals_by_grant(self) -> dict[str, list[Approval]]: ...

    def search_grants(
        self,
        person: str = "",
        entitlement: str = "",
        status: str = "",
        break_glass: bool | None = None,
        since: str = "",
        until: str = "",
        before: tuple[str, str] | None = None,
        limit: int = 50,
    ) -> list[Grant]: ...

    def iter_grants(self, batch: int = 500, **filters: Unpack[GrantFilters]) -> Iterator[Grant]: ...
