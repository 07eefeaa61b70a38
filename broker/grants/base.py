"""What every use case shares: the store, the policy and the backends, reading grants as a
person may see them, and writing audit entries. The rules for input and refusals live here too."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from .. import audit
from ..audit.events import Entry
from ..backends import Backend
from ..durations import parse_duration
from ..errors import (
    GrantNotFound,
    InvalidDuration,
    InvalidRequest,
    PolicyRefused,
)
from ..liveness import Processes
from ..metrics import Metrics
from ..models import (
    ACTIVE,
    APPROVED,
    EXPIRED,
    ISSUING,
    PENDING,
    RELEASED,
    REVOKE_FAILED,
    REVOKING,
    Credential,
    Decision,
    Grant,
    Principal,
    Refusal,
    isoformat,
    parse_time,
    utcnow,
)
from ..policy import Entitlement, Policy
from ..store import Store, Transaction

log = logging.getLogger(__name__)

REAPER = {"iss": "jit-broker", "sub": "reaper"}
MAX_REASON = 1000
MAX_TICKET = 200
REAP_BATCH = 200
REVOCATION_LEASE = timedelta(seconds=60)  # a crash mid-revocation is retried after this
# While another live broker process holds removal claims, the reaper looks again this soon: should
# that process die (kill -9), its claims are taken over within seconds, not at the lease's end.
TAKEOVER_CHECK = timedelta(seconds=5)
OPEN = (PENDING, APPROVED, ISSUING, ACTIVE)  # what counts against an entitlement's limit
AWAITING = (PENDING, APPROVED)  # requests that expire unapproved (or unactivated) at due_at
DEFAULT_REQUEST_TTL = timedelta(hours=24)
REVIEW_OUTCOMES = ("justified", "unjustified")
EXPIRY_WARNING = timedelta(minutes=5)  # the requester hears this long before the window closes
# States in which a grant may hold a credential; anything Vault holds for a grant in another state
# (or for no grant at all) is a stray.
MAY_HOLD = (ISSUING, ACTIVE, RELEASED, EXPIRED, REVOKING, REVOKE_FAILED)
# How long an issuance may be in flight (recorded `issuing`, or an extension's new credential not
# yet recorded) before what Vault holds for it counts as a stray: far beyond any Vault timeout.
ISSUE_GRACE = timedelta(minutes=2)


def _no_notification(event: str, text: str, **details: object) -> None:
    """The default when no webhook is configured."""


class GrantsBase:
    """The state every use case works on; the use cases themselves are the mixins that make up
    `Grants`."""

    def __init__(
        self,
        store: Store,
        policy: Callable[[], Policy],
        backends: dict[str, Backend],
        fingerprint_key: bytes,
        on_change: Callable[[], None] = lambda: None,
        on_record: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        retry_min: int = 5,
        retry_max: int = 300,
        notify: Callable[..., None] = _no_notification,
        heartbeat: Callable[[], datetime | None] | None = None,
        heartbeat_every: int = 30,
        behind_after: int = 60,
        removal_workers: int = 8,
        vault_health: Callable[[], dict] | None = None,
        auditor_groups: tuple[str, ...] = (),
        processes: Processes | None = None,
        metrics: Metrics | None = None,
    ):
        self.store = store
        self.policy = policy
        self.backends = backends
        self.fingerprint_key = fingerprint_key
        self.on_change = on_change  # the reaper's wake-up
        self.on_record = on_record  # new audit entries: the forwarder's wake-up
        self.clock = clock
        self.retry_min, self.retry_max = retry_min, retry_max
        self.notify = notify
        # The reaper's last completed pass (None: not running); None here: no reaper is expected.
        # A callable, so grants need not know the reaper (which imports grants).
        self.heartbeat = heartbeat
        self.heartbeat_every = heartbeat_every
        self.behind_after = behind_after  # a deadline this overdue: the reaper is behind
        self.removal_workers = removal_workers  # grants removed at once by one reaper pass
        self._removal_pool: ThreadPoolExecutor | None = None  # made at the first burst, kept
        self.vault_health = vault_health
        self.auditor_groups = tuple(auditor_groups)  # may review any break-glass grant
        # Which broker processes sharing the store are alive; None: unknown, so an issuance left
        # `issuing` is given up only after ISSUE_GRACE.
        self.processes = processes
        self.metrics = metrics or Metrics()

    @property
    def process_id(self) -> str:
        """What a grant taken to `issuing`, or an extension's claim, is stamped with ("": no
        liveness known)."""
        return self.processes.id if self.processes is not None else ""

    def _dead(self, process: str) -> bool:
        """Whether the broker process stamped `process` is certainly gone ("": not known)."""
        return bool(process) and self.processes is not None and not self.processes.is_alive(process)

    def _abandoned(self, process: str, since: str, now: datetime) -> bool:
        """Whether work that `process` began at `since` (an issuance, an extension's claim) is no
        longer in flight: its process is dead (known at once), or the grace period is over (work
        from before processes were stamped, or work a live process failed to finish)."""
        return self._dead(process) or not since or now - parse_time(since) >= ISSUE_GRACE

    def _in_flight(self, credential: Credential, now: datetime) -> bool:
        """An extension's claim whose Vault call may still be under way: what it issues is not
        on the grant's list yet, so nothing may say the grant's credentials are all gone. A claim
        of a dead process, or one older than ISSUE_GRACE, is not: what it issued is the
        reconciler's."""
        return (
            not credential.handle
            and not credential.gone_at
            and not self._abandoned(credential.issuing_process, credential.issued_at, now)
        )

    def eligible(self, principal: Principal) -> list[Entitlement]:
        return self.policy().eligible(principal)

    def break_glass_eligible(self, principal: Principal) -> list[Entitlement]:
        return self.policy().break_glass_eligible(principal)

    def not_eligible(self, principal: Principal) -> list[tuple[Entitlement, str]]:
        return self.policy().not_eligible(principal)

    def get(self, principal: Principal, grant_id: str, owner_only: bool = False) -> Grant:
        """The requester sees their grant; so does anyone who may approve its entitlement, or
        review it when it is break-glass."""
        grant = self.store.get_grant(grant_id)
        if grant is not None and (
            grant.owned_by(principal)
            or (
                not owner_only
                and (self._may_approve(principal, grant) or self.may_review(principal, grant))
            )
        ):
            return grant
        raise GrantNotFound(f"no grant {grant_id} of yours")

    def _current(self, grant_id: str, tx: Transaction | None = None) -> Grant:
        """A grant read again after it was seen (inside `tx` when given). Grants are never
        deleted, so a missing one means the store changed underneath: GrantNotFound, not a 500."""
        grant = (self.store if tx is None else tx).get_grant(grant_id)
        if grant is None:
            raise GrantNotFound(f"no grant {grant_id}")
        return grant

    def may_review(self, principal: Principal, grant: Grant) -> bool:
        """Whether this person may review this break-glass grant (reviewed or not)."""
        if not grant.break_glass:
            return False
        return (
            self.policy().check_reviewer(
                grant.entitlement, principal, grant.requester_person, self.auditor_groups
            )
            is None
        )

    def _may_approve(self, principal: Principal, grant: Grant) -> bool:
        policy = self.policy()
        if grant.entitlement not in policy.entitlements:
            return False
        refusal = policy.check_approver(grant.entitlement, principal, grant.requester_person, [])
        return refusal is None or refusal.code == "already_approved"

    def mine(self, principal: Principal) -> list[Grant]:
        return self.store.grants_of(principal.issuer, principal.subject)

    def approval_queue(self, approver: Principal) -> list[Grant]:
        """Pending requests this person may approve now (never their own, under any of their
        identities)."""
        policy = self.policy()
        return [
            grant
            for grant in self.store.grants_in((PENDING,))
            if grant.entitlement in policy.entitlements
            and policy.check_approver(
                grant.entitlement,
                approver,
                grant.requester_person,
                self.store.approvals_of(grant.id),
            )
            is None
        ]

    def describe(self, grant: Grant) -> dict:
        """A grant as the API shows it, with who approved and what is still missing."""
        view = grant.as_json()
        if grant.approvals_required:
            approvals = self.store.approvals_of(grant.id)
            policy = self.policy()
            missing = (
                policy.approval_progress(grant.entitlement, approvals)[1]
                if grant.status == PENDING and grant.entitlement in policy.entitlements
                else []
            )
            found = policy.entitlements.get(grant.entitlement)
            view["approvals"] = {
                "required": grant.approvals_required,
                "given": [{"by": a.display, "at": a.at} for a in approvals],
                "missing": missing,
                # Who could approve, in words, for the requester waiting on them.
                "rule": found.approval.describe() if found and found.approval else None,
            }
        if grant.status in AWAITING:
            view["expires_unapproved_at"] = grant.due_at
        return view

    def chain(self, grant_id: str) -> list[dict]:
        return list(self.store.audit_entries(grant_id))

    def _request_ttl(self, chosen: Entitlement) -> timedelta:
        seconds = chosen.request_ttl
        return timedelta(seconds=seconds) if seconds else DEFAULT_REQUEST_TTL

    def _log_decision(
        self,
        tx: Transaction,
        principal: Principal,
        grant_id: str,
        decision: Decision,
        **extra: object,
    ) -> None:
        self._log(
            tx,
            Entry.DECISION,
            principal.actor(),
            grant_id,
            allowed=decision.allowed,
            reasons=list(decision.reasons),
            policy_hash=decision.policy_hash,
            approvals_required=decision.approvals_required,
            auto_approved=decision.auto_approved or None,
            approvers=list(decision.approvers),
            **extra,
        )
        if not decision.allowed:
            outcome = "refused"
        elif decision.approvals_required and not decision.auto_approved:
            outcome = "needs_approval"
        else:
            outcome = "allowed"
        tx.after_commit(self.metrics.decisions.labels(outcome).inc)

    def _now(self) -> str:
        return isoformat(self.clock())

    def _changed(self, due: str = "") -> None:
        """Something was recorded: the forwarder hears at once (new entries); the reapers only
        when `due` (the grant's next deadline; "": now) falls before their next pass anyway,
        which comes within a heartbeat: a grant issued for an hour wakes nothing, so request
        threads do not hand the reaper a pass (and the GIL) per grant."""
        self.on_record()
        if not due or parse_time(due) - self.clock() <= timedelta(seconds=self.heartbeat_every):
            self.on_change()

    def _fingerprint(self, handle: str) -> str:
        return audit.fingerprint(self.fingerprint_key, handle)

    def _marks(self, backend: Backend, handle: str) -> dict:
        """What the log keeps of a credential's handle and of each name it goes by (accessor,
        lease id, database user, serial): HMACs, which `jit audit lookup` matches and nobody can
        read back."""
        names = backend.identifiers(handle) if handle else {}
        return {
            "handle": self._fingerprint(handle),
            "identifiers": {name: self._fingerprint(value) for name, value in names.items()},
        }

    def _log(
        self, tx: Transaction, type_: Entry, actor: dict, grant_id: str, **data: object
    ) -> None:
        tx.append(self._now(), type_, actor, grant_id, data)


def _validated(
    entitlement: object, duration: object, reason: object, ticket: object
) -> tuple[str, int | None, str, str]:
    """Shape checks only; what the policy demands (lengths, patterns, maxima) is broker/policy's."""
    if not isinstance(entitlement, str) or not entitlement.strip():
        raise InvalidRequest("entitlement is required")
    seconds = None
    if duration is not None and duration != "":
        try:
            seconds = parse_duration(duration)
        except ValueError as exc:
            raise InvalidDuration(str(exc)) from None
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequest("reason is required: say what the access is for")
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason is longer than {MAX_REASON} characters")
    return entitlement.strip(), seconds, reason.strip(), _short_text(ticket, "ticket", MAX_TICKET)


def _short_text(value: object, name: str, limit: int = MAX_REASON) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text")
    if len(value) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} characters")
    return value.strip()


def _raise_if_refused(decision: Decision) -> None:
    if not decision.allowed:
        raise PolicyRefused(
            decision.error,
            "; ".join(decision.reasons),
            reasons=decision.reasons,
            approvers=decision.approvers,
        )


def _raise_refusal(refusal: Refusal | None) -> None:
    if refusal is not None:
        raise PolicyRefused(refusal.code, refusal.message)
