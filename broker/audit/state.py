"""State agrees with the chain: each grant's row (status, window end, credential handle,
approvals) is held against what its audit entries say, and every disagreement is named by grant
and field. The chain is the record: a row set back to `active` after a verified removal, or an
approval row no entry records, is tampering with the table. Reads only; pure over what it is
given."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
    Grant,
)
from .chain import fingerprint
from .events import Entry

ENDED = (RELEASED, EXPIRED, REVOKING, REVOKE_FAILED)
WINDOW_ENTRIES = (Entry.BREAK_GLASS, Entry.EXTEND, Entry.RELEASE, Entry.EXPIRE)
READS_DATA = frozenset((Entry.ISSUE, Entry.VERIFY, Entry.RECONCILE, *WINDOW_ENTRIES))


def _decoded(value: object) -> dict:
    """A JSON object as stored, or already decoded; anything else as empty."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


@dataclass
class ChainSays:
    """What one grant's entries, read in order, establish."""

    requested: bool = False
    closed: str = ""  # denied, cancelled, expired_unapproved, issue_failed: the entry said so
    ended_by: str = ""  # release or expire
    issued: list[str] = field(default_factory=list)  # HMACs of each credential's handle
    gone: set[str] = field(default_factory=set)
    window_end: str = ""  # the newest window end an entry states
    approvers: set[tuple[str, str]] = field(default_factory=set)

    def read(self, entry: dict) -> None:
        """`entry`'s actor and data decoded, or as stored (JSON text): then decoded only for
        the kinds of entry whose content is read."""
        kind = entry.get("type")
        data = _decoded(entry.get("data")) if kind in READS_DATA else {}
        if kind == Entry.REQUEST:
            self.requested = True
        elif kind == Entry.DENIAL:
            self.closed = DENIED
        elif kind == Entry.CANCEL:
            self.closed = CANCELLED
        elif kind == Entry.EXPIRE_UNAPPROVED:
            self.closed = EXPIRED_UNAPPROVED
        elif kind == Entry.ISSUE_FAILED and not self.issued:
            self.closed = ISSUE_FAILED
        elif kind in (Entry.ISSUE, Entry.EXTEND) and isinstance(data.get("handle"), str):
            self.issued.append(data["handle"])
        elif kind in (Entry.VERIFY, Entry.RECONCILE) and data.get("gone") is True:
            self.gone.add(str(data.get("handle")))
        elif kind == Entry.APPROVAL:
            actor = _decoded(entry.get("actor"))
            self.approvers.add((str(actor.get("iss")), str(actor.get("sub"))))
        if kind in (Entry.RELEASE, Entry.EXPIRE):
            self.ended_by = str(kind)
        if kind in WINDOW_ENTRIES and isinstance(data.get("window_end"), str):
            self.window_end = data["window_end"]

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
    grants: Iterable[Grant],
    entries: Iterable[dict],
    approvals_of: Callable[[str], list[Approval]],
    fingerprint_key: bytes,
) -> list[str]:
    """Every disagreement between the grants table and the chain, "grant <id>: <field> ..."."""
    chains: dict[str, ChainSays] = {}
    for entry in entries:
        grant_id = entry.get("grant_id")
        if isinstance(grant_id, str) and grant_id:
            chains.setdefault(grant_id, ChainSays()).read(entry)
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
    grant: Grant, says: ChainSays, approvals: list[Approval], fingerprint_key: bytes
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
        held = fingerprint(fingerprint_key, grant.handle) if grant.handle else ""
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
