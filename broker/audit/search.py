"""The auditors' search over the grants: who may search, which grants match a filter (newest
first, page by page), one grant with its approvals and its verified timeline, and a CSV export of
every match. Reads the store and the audit log; writes nothing. No Flask here:
`web/audit_pages.py` turns requests into these calls."""

from __future__ import annotations

import csv
import heapq
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .. import models
from ..errors import ConfigError, Forbidden, GrantNotFound, InvalidRequest
from ..models import Approval, Grant, Principal, isoformat
from .log import AuditLog, Timeline
from .storage import GrantFilters

PAGE_SIZE = 50

STATUSES = models.STATES

# The states in the words people use, the same on every page and in the filter: a word stands for
# the states a person would not tell apart (a released grant is soon `revoked`; both "ended").
STATE_WORDS: dict[str, tuple[str, ...]] = {
    "waiting": (models.PENDING,),
    "approved": (models.APPROVED,),
    "active": (models.ISSUING, models.ACTIVE),
    "ended": (models.RELEASED, models.EXPIRED, models.REVOKING, models.REVOKED),
    "removal_failing": (models.REVOKE_FAILED,),
    "denied": (models.DENIED,),
    "cancelled": (models.CANCELLED,),
    "expired_unapproved": (models.EXPIRED_UNAPPROVED,),
    "issue_failed": (models.ISSUE_FAILED,),
}
WORD_LABELS = {
    "waiting": "waiting for approval",
    "approved": "approved, not yet active",
    "active": "active",
    "ended": "ended",
    "removal_failing": "removal not verified",
    "denied": "denied",
    "cancelled": "cancelled",
    "expired_unapproved": "expired unapproved",
    "issue_failed": "issue failed",
}
STATE_WORD_OF = {state: word for word, states in STATE_WORDS.items() for state in states}

BREAK_GLASS_CHOICES = {"": None, "any": None, "yes": True, "no": False}

# What the CSV holds: the grant's record, never its handle (the credential's accessor or lease).
CSV_COLUMNS = (
    "id",
    "created_at",
    "requester",
    "requester_iss",
    "requester_sub",
    "entitlement",
    "status",
    "break_glass",
    "window_start",
    "window_end",
    "duration",
    "reason",
    "ticket",
    "approvals_required",
    "closed_reason",
    "review_due",
    "reviewed_at",
    "reviewed_by",
    "policy_hash",
    "backend",
    "credential_expires_at",
    "last_error",
    "updated_at",
)

# A spreadsheet takes a cell starting with one of these as a formula (OWASP: CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class GrantFilter:
    """What an auditor narrows the grants to; empty (or None) means "any". Times are UTC ISO
    8601 in the store's own form, so that they compare as text with `created_at`."""

    person: str = ""
    entitlement: str = ""
    status: str = ""
    break_glass: bool | None = None
    since: str = ""
    until: str = ""

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> GrantFilter:
        """From a query string; a value that cannot be a filter is an InvalidRequest (400) that
        says which and why, never a query that silently matches nothing."""
        status = args.get("status", "").strip()
        if status and status not in STATUSES and status not in STATE_WORDS:
            raise InvalidRequest(
                f"status {status!r} is not a grant state (one of {', '.join(STATE_WORDS)})"
            )
        break_glass = args.get("break_glass", "").strip().lower()
        if break_glass not in BREAK_GLASS_CHOICES:
            raise InvalidRequest(f"break_glass must be any, yes or no, not {break_glass!r}")
        since = parse_utc(args.get("since", ""), "since")
        until = parse_utc(args.get("until", ""), "until")
        if since and until and until <= since:
            raise InvalidRequest(f"until ({until}) must be later than since ({since})")
        return cls(
            person=args.get("person", "").strip(),
            entitlement=args.get("entitlement", "").strip(),
            status=status,
            break_glass=BREAK_GLASS_CHOICES[break_glass],
            since=since,
            until=until,
        )

    def as_args(self) -> dict[str, str]:
        """The filter as query arguments (the set ones only), for links that keep it."""
        args = {
            "person": self.person,
            "entitlement": self.entitlement,
            "status": self.status,
            "break_glass": {None: "", True: "yes", False: "no"}[self.break_glass],
            "since": self.since,
            "until": self.until,
        }
        return {name: value for name, value in args.items() if value}

    @property
    def states(self) -> tuple[str, ...]:
        """The states the status filter stands for: a word's, or one state given by name."""
        if not self.status:
            return ("",)
        return STATE_WORDS.get(self.status, (self.status,))

    def store_args(self, status: str | None = None) -> GrantFilters:
        return {
            "person": self.person,
            "entitlement": self.entitlement,
            "status": self.status if status is None else status,
            "break_glass": self.break_glass,
            "since": self.since,
            "until": self.until,
        }


def parse_utc(text: str, name: str) -> str:
    """A point in time as the store writes it (`2026-11-23T10:00:00Z`). Accepts ISO 8601 with Z
    or an offset (converted to UTC); one without a zone is taken as UTC. "" stays ""."""
    text = (text or "").strip()
    if not text:
        return ""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return isoformat(moment)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{name} {text!r} is not a UTC ISO 8601 time like 2026-11-23T10:00:00Z"
        ) from None


def parse_cursor(at: str, grant_id: str) -> tuple[str, str] | None:
    """The keyset cursor of a "next page" link: the last row's (created_at, id)."""
    if not at and not grant_id:
        return None
    if not (at and grant_id):
        raise InvalidRequest("a page cursor needs both before_at and before_id")
    return (parse_utc(at, "before_at"), grant_id)


def neutralise(value: object) -> object:
    """A cell a spreadsheet would run as a formula gets a leading single quote."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


@dataclass(frozen=True)
class Page:
    grants: list[Grant]
    next_cursor: tuple[str, str] | None  # (created_at, id) of the last row, if more may follow


@dataclass(frozen=True)
class GrantHistory:
    """One grant as an auditor reads it: the record, who approved it, its verified entries."""

    grant: Grant
    approvals: list[Approval]
    timeline: Timeline


class AuditSearch:
    def __init__(self, audit_log: AuditLog, auditor_groups: Iterable[str]):
        self.audit_log = audit_log
        self.store = audit_log.store
        if not isinstance(auditor_groups, list | tuple | set | frozenset) or not all(
            isinstance(group, str) for group in auditor_groups
        ):
            # A bare string would become a set of its letters: groups "a", "u", ... as auditors.
            raise ConfigError(
                f"audit.auditor_groups must be a list of group names, not {auditor_groups!r}"
            )
        self.auditor_groups = frozenset(auditor_groups)

    def is_auditor(self, principal: Principal | None) -> bool:
        return principal is not None and bool(self.auditor_groups.intersection(principal.groups))

    def require_auditor(self, principal: Principal) -> None:
        if not self.is_auditor(principal):
            groups = ", ".join(sorted(self.auditor_groups)) or "(none configured)"
            raise Forbidden(
                f"the review pages are for auditors only: members of {groups}. "
                f"{principal.display} is not in any of them."
            )

    def search(
        self,
        grant_filter: GrantFilter,
        before: tuple[str, str] | None = None,
        limit: int = PAGE_SIZE,
    ) -> Page:
        """One page of matches; asks for one row more than it shows, to know if another follows."""
        # A word stands for several states: each state's newest rows, merged, are the newest of all.
        rows = sorted(
            (
                grant
                for state in grant_filter.states
                for grant in self.store.search_grants(
                    **grant_filter.store_args(state), before=before, limit=limit + 1
                )
            ),
            key=_created,
            reverse=True,
        )
        grants = rows[:limit]
        more = len(rows) > limit
        return Page(grants, (grants[-1].created_at, grants[-1].id) if more else None)

    def grant(self, grant_id: str) -> GrantHistory:
        grant = self.store.get_grant(grant_id)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_id}")
        return GrantHistory(
            grant, self.store.approvals_of(grant.id), self.audit_log.timeline(grant.id)
        )

    def export_csv(self, grant_filter: GrantFilter) -> Iterator[str]:
        """Every match as CSV, a header first, one line at a time (never all rows in memory)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")

        def line(values: Iterable[object]) -> str:
            writer.writerow(values)
            text = buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            return text

        yield line(CSV_COLUMNS)
        for grant in self.iter_grants(grant_filter):
            yield line(neutralise(getattr(grant, column)) for column in CSV_COLUMNS)

    def iter_grants(self, grant_filter: GrantFilter) -> Iterator[Grant]:
        """Every match, newest first, batch by batch (several states merged in order)."""
        return heapq.merge(
            *(
                self.store.iter_grants(**grant_filter.store_args(state))
                for state in grant_filter.states
            ),
            key=_created,
            reverse=True,
        )

    def export_jsonl(self, grant_filter: GrantFilter) -> Iterator[str]:
        """Every match as JSON lines: the grant as the API shows it, then its audit entries."""
        for grant in self.iter_grants(grant_filter):
            record = {**grant.as_json(), "requester_iss": grant.requester_iss,
                      "requester_sub": grant.requester_sub, "policy_hash": grant.policy_hash,
                      "entries": list(self.store.audit_entries(grant.id))}  # fmt: skip
            yield json.dumps(record, sort_keys=True) + "\n"


def _created(grant: Grant) -> tuple[str, str]:
    """The store's order (newest first, reversed): created_at, then id."""
    return (grant.created_at, grant.id)
