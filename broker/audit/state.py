"""State agrees with the chain: each grant's row (status, window end, credential handle,
approvals) is held against what its audit entries say, and every disagreement is named by grant
and field. The chain is the record: a row set back to `active` after a verified removal, or an
approval row no entry records, is tampering with the table. Reads only; pure over what it is
given. `jit audit verify` first lets the database vouch for the rows it can (store/grant_chains.py
folds each chain in SQL as `ChainSays` reads it: a change to what a chain says here is a change
there too) and judges only the rest here."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..models import (
    ACTIVE,
    APPROVED,
    CANCELLED,
    DENIED,
    EXPIRED,
    EXPIRED_UNAPPROVED,
    ISSUE_FAILED,
    ISSUING,
    PENDING,
    RELEASED,
    REVOKE_FAILED,
    REVOKED,
    REVOKING,
    Approval,
)
from .chain import FINGERPRINT_PREFIX
from .events import Entry

ENDED = (RELEASED, EXPIRED, REVOKING, REVOKE_FAILED)
WINDOW_ENTRIES = (Entry.BREAK_GLASS, Entry.EXTEND, Entry.RELEASE, Entry.EXPIRE)
READS_DATA = frozenset((Entry.ISSUE, Entry.VERIFY, Entry.RECONCILE, *WINDOW_ENTRIES))
# The kinds of entry that change what a chain says: the only ones the state check reads.
READS = frozenset(
    (Entry.REQUEST, Entry.DENIAL, Entry.CANCEL, Entry.EXPIRE_UNAPPROVED, Entry.ISSUE_FAILED,
     Entry.APPROVAL, *READS_DATA)
)  # fmt: skip
# The kinds as plain strings, for the comparisons made for every entry read (a StrEnum
# member's lookup and comparison cost several times a str's).
_REQUEST, _APPROVAL, _ISSUE_FAILED = (
    str(Entry.REQUEST),
    str(Entry.APPROVAL),
    str(Entry.ISSUE_FAILED),
)
_CLOSING = {str(Entry.DENIAL): DENIED, str(Entry.CANCEL): CANCELLED,
            str(Entry.EXPIRE_UNAPPROVED): EXPIRED_UNAPPROVED}  # fmt: skip
_ISSUING = frozenset((str(Entry.ISSUE), str(Entry.EXTEND)))
_GONE = frozenset((str(Entry.VERIFY), str(Entry.RECONCILE)))
_ENDING = frozenset((str(Entry.RELEASE), str(Entry.EXPIRE)))
_WINDOW = frozenset(str(kind) for kind in WINDOW_ENTRIES)
_READS_DATA = frozenset(str(kind) for kind in READS_DATA)


class GrantRow(Protocol):
    """What the state check reads of a grant row (a `Grant`, or the store's `grant_states`)."""

    @property
    def id(self) -> str: ...

    @property
    def status(self) -> str: ...

    @property
    def window_end(self) -> str: ...

    @property
    def handle(self) -> str: ...


class GrantState(NamedTuple):
    """A grant row's fields the chain speaks of, as `Store.grant_states` reads them."""

    id: str
    status: str
    window_end: str
    handle: str


def _decoded(value: object) -> dict:
    """A JSON object as stored, or already decoded; anything else as empty."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class ChainSays:
    """What one grant's entries, read in order, establish."""

    requested: bool = False
    closed: str = ""  # denied, cancelled, expired_unapproved, issue_failed: the entry said so
    ended_by: str = ""  # release or expire
    issued: list[str] = field(default_factory=list)  # HMACs of each credential's handle
    gone: set[str] = field(default_factory=set)
    window_end: str = ""  # the newest window end an entry states
    approvers: set[tuple[str, str]] = field(default_factory=set)

    def read(self, kind: str, actor: object, data: object) -> None:
        """One entry: its `actor` and `data` decoded, or as stored (JSON text), decoded only
        for the kinds of entry whose content is read."""
        if kind == _REQUEST:
            self.requested = True
            return
        if kind in _CLOSING:
            self.closed = _CLOSING[kind]
        elif kind == _ISSUE_FAILED:
            if not self.issued:
                self.closed = ISSUE_FAILED
        elif kind == _APPROVAL:
            who = _decoded(actor)
            self.approvers.add((str(who.get("iss")), str(who.get("sub"))))
        if kind not in _READS_DATA:
            return
        content = _decoded(data)
        if kind in _ISSUING:
            if isinstance(content.get("handle"), str):
                self.issued.append(content["handle"])
        elif kind in _GONE:
            if content.get("gone") is True:
                self.gone.add(str(content.get("handle")))
        if kind in _ENDING:
            self.ended_by = kind
        if kind in _WINDOW and isinstance(content.get("window_end"), str):
            self.window_end = content["window_end"]

    def statuses(self) -> tuple[tuple[str, ...], str]:
        """The statuses the row may have, and why, in words."""
        if self.closed:
            return (self.closed,), f"its chain ends in {self.closed}"
        if self.ended_by and self.issued and set(self.issued) <= self.gone:
            return (
                REVOKED,
            ), f"its chain records the {self.ended_by} and every credential verified gone"
        if self.ended_by:
            return ENDED, f"its chain records the {self.ended_by}, not yet every credential gone"
        if self.issued:
            return (ACTIVE,), "its chain records the issue and no end"
        return (PENDING, APPROVED, ISSUING), "its chain records no issue"


def grant_problems(
    grants: Iterable[GrantRow],
    entries: Iterable[tuple[str | None, str, object, object]],
    approvals_of: Callable[[str], list[Approval]],
    fingerprint_key: bytes,
) -> list[str]:
    """Every disagreement between the grants table and the chain, "grant <id>: <field> ...".
    `entries`: (grant_id, type, actor, data) of the grants' entries in sequence order (those of
    the kinds in READS suffice: the others say nothing here)."""
    chains: dict[str, ChainSays] = {}
    found = chains.get
    for grant_id, kind, actor, data in entries:
        if isinstance(grant_id, str) and grant_id:
            says = found(grant_id)
            if says is None:
                says = chains[grant_id] = ChainSays()
            says.read(kind, actor, data)
    problems: list[str] = []
    seen: set[str] = set()
    for grant in grants:
        seen.add(grant.id)
        says = chains.get(grant.id)
        if says is None or not says.requested:
            problems.append(f"grant {grant.id}: a row with no request in the chain")
            continue
        problems.extend(_row_against(grant, says, approvals_of(grant.id), fingerprint_key))
    for grant_id, says in chains.items():
        if grant_id not in seen and says.requested:
            problems.append(f"grant {grant_id}: its chain has a request but the table no row")
    return problems


def _row_against(
    grant: GrantRow, says: ChainSays, approvals: list[Approval], fingerprint_key: bytes
) -> list[str]:
    found = []
    allowed, why = says.statuses()
    if grant.status not in allowed:
        found.append(
            f"grant {grant.id}: status is {grant.status}, but {why} ({' or '.join(allowed)})"
        )
    if says.window_end and grant.window_end != says.window_end:
        found.append(
            f"grant {grant.id}: window end is {grant.window_end}, but its chain says "
            f"{says.window_end}"
        )
    if fingerprint_key:
        newest = says.issued[-1] if says.issued else ""
        held = handle_fingerprint(fingerprint_key, grant.handle)
        if held != newest:
            found.append(
                f"grant {grant.id}: credential handle "
                + (
                    "is set, but its chain records no credential issued"
                    if held and not newest
                    else "is empty, but its chain records one issued"
                    if newest and not held
                    else "is not the one its chain records as issued last"
                )
            )
    rows = {(a.issuer, a.subject) for a in approvals}
    for issuer, subject in sorted(rows - says.approvers):
        found.append(
            f"grant {grant.id}: approvals: {subject} ({issuer}) approved in the table, but "
            "no approval entry of the chain records it"
        )
    for issuer, subject in sorted(says.approvers - rows):
        found.append(
            f"grant {grant.id}: approvals: the chain records an approval by {subject} "
            f"({issuer}) that the table does not hold"
        )
    return found


def handle_fingerprint(key: bytes, handle: str | None) -> str:
    """A grant row's handle as its chain records it (chain.fingerprint, by hmac's one-shot
    digest: a fraction of hmac.new's cost a grant); "" for none."""
    return FINGERPRINT_PREFIX + hmac.digest(key, handle.encode(), "sha256").hex() if handle else ""
