"""The use cases: request, approve, deny, cancel, activate, release, reap. The one place that
changes a grant's state; every change is written with its audit entries in one transaction, and
every transition is conditional on the state it starts from, so racing callers cannot both win."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import NamedTuple

from . import audit, notify
from .durations import parse_duration
from .errors import (
    BrokerError,
    BrokerUnhealthy,
    GrantConflict,
    GrantNotFound,
    InvalidDuration,
    InvalidRequest,
    PolicyRefused,
)
from .models import (
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
    TO_REAP,
    Approval,
    Decision,
    Grant,
    Holding,
    IssuedCredential,
    Principal,
    isoformat,
    parse_time,
    utcnow,
)
from .policy import Entitlement, Policy
from .store import Store, Transaction

log = logging.getLogger(__name__)

REAPER = {"iss": "jit-broker", "sub": "reaper"}
MAX_REASON = 1000
MAX_TICKET = 200
REAP_BATCH = 200
REVOCATION_LEASE = timedelta(seconds=60)  # a crash mid-revocation is retried after this
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


def _no_notification(event: str, text: str, **details) -> None:
    """The default when no webhook is configured."""


class Grants:
    def __init__(
        self,
        store: Store,
        policy: Callable[[], Policy],
        backends: dict,
        fingerprint_key: bytes,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        retry_min: int = 5,
        retry_max: int = 300,
        notify: Callable[..., None] = _no_notification,
        heartbeat: Callable[[], datetime | None] | None = None,
        heartbeat_every: int = 30,
        vault_health: Callable[[], dict] | None = None,
        auditor_groups: tuple[str, ...] = (),
    ):
        self.store = store
        self.policy = policy
        self.backends = backends
        self.fingerprint_key = fingerprint_key
        self.on_change = on_change  # the reaper's wake-up
        self.clock = clock
        self.retry_min, self.retry_max = retry_min, retry_max
        self.notify = notify
        # The reaper's last completed pass (None: not running); None here: no reaper is expected.
        # A callable, so grants need not know the reaper (which imports grants).
        self.heartbeat = heartbeat
        self.heartbeat_every = heartbeat_every
        self.vault_health = vault_health
        self.auditor_groups = tuple(auditor_groups)  # may review any break-glass grant

    def eligible(self, principal: Principal) -> list[Entitlement]:
        return self.policy().eligible(principal)

    def break_glass_eligible(self, principal: Principal) -> list[Entitlement]:
        return self.policy().break_glass_eligible(principal)

    # --- requesting -------------------------------------------------------------------------

    def request(
        self,
        principal: Principal,
        entitlement: object,
        duration: object,
        reason: object,
        ticket: object = "",
        public_key: object = "",
        break_glass: object = False,
    ) -> tuple[Grant, IssuedCredential | None]:
        """Check the policy; then either issue at once, or record a pending request that waits
        for approvals. Bad input and refusals leave no trace; a Vault failure leaves a grant
        marked issue_failed, never one that claims a credential. `public_key` is what an SSH
        certificate is signed for; it is needed when issuing (now, or at activation).
        `break_glass` takes the emergency path: issued at once, reviewed afterwards."""
        if not isinstance(break_glass, bool):
            raise InvalidRequest("break_glass must be true or false")
        entitlement, seconds, reason, ticket = _validated(entitlement, duration, reason, ticket)
        self._refuse_if_unhealthy()
        policy = self.policy()
        if break_glass:
            return self._break_glass(policy, principal, entitlement, seconds, reason, public_key)
        open_now = self.store.count_open(principal.issuer, principal.subject, entitlement, OPEN)
        decision = policy.evaluate(
            principal,
            entitlement,
            seconds,
            reason=reason,
            ticket=ticket,
            now=self.clock(),
            active=open_now,
        )
        _raise_if_refused(decision)
        chosen = policy.entitlements[entitlement]
        status = PENDING if decision.approvals_required else ISSUING
        if status == ISSUING:
            self._check_request(chosen, public_key)
        grant = self._record_request(policy, principal, chosen, decision, reason, ticket, status)
        if status == PENDING:
            self.notify(
                notify.NEW_REQUEST,
                notify.new_request_text(grant),
                grant_id=grant.id,
                audience="approvers",
                fields={"approvers": ", ".join(decision.approvers)},
            )
            self.on_change()  # the reaper must expire it if nobody approves
            return grant, None
        return self._issue(principal, grant, chosen, public_key)

    def _check_request(self, chosen: Entitlement, public_key: object) -> None:
        """What the backend needs from the requester, checked before anything is recorded."""
        check = getattr(self.backends[chosen.backend], "check_request", None)
        if check is not None:
            check(public_key)

    def _record_request(
        self,
        policy: Policy,
        principal: Principal,
        chosen: Entitlement,
        decision: Decision,
        reason: str,
        ticket: str,
        status: str,
        review_within: int | None = None,
    ) -> Grant:
        """Record the request and the decision, in one transaction. `review_within` (seconds)
        marks a break-glass grant: its window ignores the schedule, and its review falls due."""
        now = self.clock().replace(microsecond=0)
        start, end, due, review_due = "", "", "", ""
        if review_within is not None:
            start = isoformat(now)
            end = isoformat(now + timedelta(seconds=decision.duration))
            review_due = isoformat(now + timedelta(seconds=review_within))
        elif status == ISSUING:
            start = isoformat(now)
            end = isoformat(policy.window_end(chosen.name, now, decision.duration))
        else:
            due = isoformat(now + self._request_ttl(chosen))
        grant = Grant(
            id=str(uuid.uuid4()),
            requester_iss=principal.issuer,
            requester_sub=principal.subject,
            requester=principal.display,
            entitlement=chosen.name,
            reason=reason,
            duration=decision.duration,
            status=status,
            created_at=isoformat(now),
            window_start=start,
            window_end=end,
            backend=chosen.backend,
            policy_hash=decision.policy_hash,
            due_at=due,
            updated_at=isoformat(now),
            ticket=ticket,
            approvals_required=decision.approvals_required,
            break_glass=int(review_within is not None),
            review_due=review_due,
        )
        with self.store.transaction() as tx:
            tx.insert_grant(grant)
            self._log(
                tx,
                "request",
                principal.actor(),
                grant.id,
                principal=principal.claims(),
                entitlement=chosen.name,
                duration=decision.duration,
                reason=reason,
                ticket=ticket or None,
                break_glass=grant.break_glass == 1 or None,
            )
            self._log_decision(tx, principal, grant.id, decision)
            if grant.break_glass:
                self._log(
                    tx,
                    "break_glass",
                    principal.actor(),
                    grant.id,
                    entitlement=chosen.name,
                    reason=reason,
                    duration=decision.duration,
                    window_end=end,
                    review_due=review_due,
                    reviewers=list(chosen.break_glass.reviewers),
                )
        return grant

    def _break_glass(
        self,
        policy: Policy,
        principal: Principal,
        entitlement: str,
        seconds: int | None,
        reason: str,
        public_key: object,
    ) -> tuple[Grant, IssuedCredential]:
        """The emergency path: no approval, no ticket, no schedule; a loud alert, and a review
        that falls due. Issued through the same intent-then-record steps as any grant."""
        decision = policy.evaluate_break_glass(principal, entitlement, seconds, reason)
        _raise_if_refused(decision)
        chosen = policy.entitlements[entitlement]
        self._check_request(chosen, public_key)
        grant = self._record_request(
            policy,
            principal,
            chosen,
            decision,
            reason,
            "",
            ISSUING,
            chosen.break_glass.review_within,
        )
        self.notify(
            notify.BREAK_GLASS,
            notify.break_glass_text(grant),
            grant_id=grant.id,
            audience="security",
            fields={"reviewers": ", ".join(chosen.break_glass.reviewers)},
        )
        return self._issue(principal, grant, chosen, public_key)

    def review(self, reviewer: Principal, grant_id: str, outcome: object, notes: object) -> Grant:
        """Close a break-glass grant's mandatory review, once, by someone other than its
        requester. The window may still be open: a review does not end it."""
        if outcome not in REVIEW_OUTCOMES:
            raise InvalidRequest(f"outcome must be one of {', '.join(REVIEW_OUTCOMES)}")
        notes = _short_text(notes, "notes")
        if not notes:
            raise InvalidRequest("notes are required: what happened, and was it justified")
        policy = self.policy()
        with self.store.transaction() as tx:
            grant = tx.get_grant(grant_id)
            if grant is None:
                raise GrantNotFound(f"no grant {grant_id}")
            if not grant.break_glass:
                raise PolicyRefused(
                    "not_break_glass", f"grant {grant_id} is not a break-glass grant"
                )
            _raise_refusal(
                policy.check_reviewer(
                    grant.entitlement,
                    reviewer,
                    (grant.requester_iss, grant.requester_sub),
                    self.auditor_groups,
                )
            )
            if grant.reviewed_at:
                raise PolicyRefused(
                    "already_reviewed",
                    f"grant {grant_id} was reviewed by {grant.reviewed_by} at {grant.reviewed_at}",
                )
            now = self._now()
            tx.move_grant(
                grant.id,
                grant.status,
                reviewed_at=now,
                reviewed_by=reviewer.display,
                updated_at=now,
            )
            self._log(
                tx,
                "review",
                reviewer.actor(),
                grant.id,
                reviewer=reviewer.claims(),
                outcome=outcome,
                notes=notes,
                review_due=grant.review_due,
                late=now > grant.review_due or None,
            )
        return self.store.get_grant(grant.id)

    def _request_ttl(self, chosen: Entitlement) -> timedelta:
        seconds = chosen.request_ttl
        return timedelta(seconds=seconds) if seconds else DEFAULT_REQUEST_TTL

    def _log_decision(
        self, tx: Transaction, principal: Principal, grant_id: str, decision: Decision, **extra
    ) -> None:
        self._log(
            tx,
            "decision",
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

    # --- approvals --------------------------------------------------------------------------

    def approve(self, approver: Principal, grant_id: str, reason: object = "") -> Grant:
        """Count one person's approval. Checked and written under the write lock, so two
        approvers clicking at once are counted in turn and the request moves on exactly once."""
        reason = _short_text(reason, "reason")
        policy = self.policy()
        with self.store.transaction() as tx:
            grant = self._pending_for_decision(tx, grant_id)
            approvals = self.store.approvals_of(grant.id)
            _raise_refusal(
                policy.check_approver(
                    grant.entitlement, approver, grant.requester_iss, grant.requester_sub, approvals
                )
            )
            approval = Approval(
                approver.issuer, approver.subject, approver.display, approver.groups, self._now()
            )
            if not tx.add_approval(grant.id, approval):
                raise PolicyRefused("already_approved", "you have already approved this request")
            satisfied, missing = policy.approval_progress(grant.entitlement, [*approvals, approval])
            self._log(
                tx,
                "approval",
                approver.actor(),
                grant.id,
                approver=approver.claims(),
                reason=reason or None,
                satisfied=satisfied,
                missing=missing,
            )
            if satisfied:
                tx.move_grant(
                    grant.id,
                    PENDING,
                    status=APPROVED,
                    updated_at=self._now(),
                    due_at=isoformat(
                        self.clock() + self._request_ttl(policy.entitlements[grant.entitlement])
                    ),
                )
        grant = self.store.get_grant(grant.id)
        if satisfied:
            self.notify(
                notify.APPROVED,
                notify.approved_text(grant, approver.display),
                grant_id=grant.id,
                audience="requester",
            )
            self.on_change()
        return grant

    def deny(self, approver: Principal, grant_id: str, reason: object) -> Grant:
        reason = _short_text(reason, "reason")
        if not reason:
            raise InvalidRequest("reason is required: tell the requester why")
        policy = self.policy()
        with self.store.transaction() as tx:
            grant = self._pending_for_decision(tx, grant_id)
            refusal = policy.check_approver(
                grant.entitlement, approver, grant.requester_iss, grant.requester_sub, []
            )
            _raise_refusal(refusal)
            tx.move_grant(
                grant.id,
                PENDING,
                status=DENIED,
                closed_reason=reason,
                due_at="",
                updated_at=self._now(),
            )
            self._log(
                tx, "denial", approver.actor(), grant.id, approver=approver.claims(), reason=reason
            )
        grant = self.store.get_grant(grant.id)
        self.notify(
            notify.DENIED,
            notify.denied_text(grant, approver.display, reason),
            grant_id=grant.id,
            audience="requester",
        )
        return grant

    def _pending_for_decision(self, tx: Transaction, grant_id: str) -> Grant:
        grant = tx.get_grant(grant_id)
        if grant is None:
            raise GrantNotFound(f"no request {grant_id}")
        if grant.status != PENDING:
            raise GrantConflict(
                f"request {grant_id} is {grant.status}: it can no longer be approved or denied"
            )
        return grant

    def cancel(self, principal: Principal, grant_id: str) -> Grant:
        """The requester withdraws a request that has not been issued yet."""
        grant = self.get(principal, grant_id, owner_only=True)
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id,
                AWAITING,
                status=CANCELLED,
                due_at="",
                closed_reason="cancelled by the requester",
                updated_at=self._now(),
            ):
                raise GrantConflict(
                    f"request {grant.id} is {tx.get_grant(grant.id).status}: "
                    "only a pending or approved request can be cancelled"
                )
            self._log(tx, "cancel", principal.actor(), grant.id)
        self.on_change()
        return self.store.get_grant(grant.id)

    def activate(
        self, principal: Principal, grant_id: str, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        """Issue an approved request to its requester. The policy is applied again with the
        requester's claims of now: whoever left the group while waiting gets nothing."""
        grant = self.get(principal, grant_id, owner_only=True)
        self._refuse_if_unhealthy()
        policy = self.policy()
        if grant.entitlement in policy.entitlements:
            self._check_request(policy.entitlements[grant.entitlement], public_key)
        open_now = self.store.count_open(
            principal.issuer, principal.subject, grant.entitlement, OPEN, excluding=grant.id
        )
        decision = policy.evaluate(
            principal,
            grant.entitlement,
            grant.duration,
            reason=grant.reason,
            ticket=grant.ticket,
            now=self.clock(),
            active=open_now,
        )
        now = self.clock().replace(microsecond=0)
        with self.store.transaction() as tx:
            current = tx.get_grant(grant.id)
            if current.status != APPROVED:
                raise GrantConflict(f"request {grant.id} is {current.status}, not approved")
            if not decision.allowed:
                tx.move_grant(
                    grant.id,
                    APPROVED,
                    status=DENIED,
                    due_at="",
                    closed_reason=f"refused at activation: {decision.reasons[0]}",
                    updated_at=isoformat(now),
                )
            else:
                end = policy.window_end(grant.entitlement, now, grant.duration)
                tx.move_grant(
                    grant.id,
                    APPROVED,
                    status=ISSUING,
                    window_start=isoformat(now),
                    window_end=isoformat(end),
                    due_at="",
                    updated_at=isoformat(now),
                )
            self._log_decision(tx, principal, grant.id, decision, at_activation=True)
        _raise_if_refused(decision)
        grant = self.store.get_grant(grant.id)
        return self._issue(principal, grant, policy.entitlements[grant.entitlement], public_key)

    # --- issuing ----------------------------------------------------------------------------

    def _issue(
        self, principal: Principal, grant: Grant, chosen: Entitlement, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        backend = self.backends[chosen.backend]
        try:
            credential = backend.issue(
                grant.id, chosen, parse_time(grant.window_end), principal.display, public_key
            )
        except BrokerError as exc:
            with self.store.transaction() as tx:
                tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=ISSUE_FAILED,
                    last_error=exc.detail,
                    updated_at=self._now(),
                )
                self._log(
                    tx,
                    "issue_failed",
                    principal.actor(),
                    grant.id,
                    backend=chosen.backend,
                    error=exc.detail,
                )
            raise
        try:
            with self.store.transaction() as tx:
                if not tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=ACTIVE,
                    handle=credential.handle,
                    credential_expires_at=isoformat(credential.expires_at),
                    due_at=_first_look(grant),
                    updated_at=self._now(),
                ):
                    # The reconciler gave it up as abandoned: what Vault just issued must go.
                    raise GrantConflict(f"grant {grant.id} stopped issuing while Vault answered")
                self._log(
                    tx,
                    "issue",
                    principal.actor(),
                    grant.id,
                    backend=chosen.backend,
                    **self._marks(backend, credential.handle),
                    **credential.details,
                )
        except BrokerError:
            backend.revoke(credential.handle)
            raise
        except Exception as exc:
            # No record of the credential means the credential must not exist either.
            backend.revoke(credential.handle)
            log.exception("grant %s: the issued credential could not be recorded", grant.id)
            raise BrokerUnhealthy(
                "the issued credential could not be recorded in the audit log, "
                "so it was revoked at once; nothing was issued"
            ) from exc
        self.on_change()
        return self.store.get_grant(grant.id), credential

    # --- reading ----------------------------------------------------------------------------

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

    def may_review(self, principal: Principal, grant: Grant) -> bool:
        """Whether this person may review this break-glass grant (reviewed or not)."""
        if not grant.break_glass:
            return False
        requester = (grant.requester_iss, grant.requester_sub)
        return (
            self.policy().check_reviewer(
                grant.entitlement, principal, requester, self.auditor_groups
            )
            is None
        )

    def _may_approve(self, principal: Principal, grant: Grant) -> bool:
        policy = self.policy()
        if grant.entitlement not in policy.entitlements:
            return False
        refusal = policy.check_approver(
            grant.entitlement, principal, grant.requester_iss, grant.requester_sub, []
        )
        return refusal is None or refusal.code == "already_approved"

    def mine(self, principal: Principal) -> list[Grant]:
        return self.store.grants_of(principal.issuer, principal.subject)

    def approval_queue(self, approver: Principal) -> list[Grant]:
        """Pending requests this person may approve now (never their own)."""
        policy = self.policy()
        return [
            grant
            for grant in self.store.grants_in((PENDING,))
            if grant.entitlement in policy.entitlements
            and policy.check_approver(
                grant.entitlement,
                approver,
                grant.requester_iss,
                grant.requester_sub,
                self.store.approvals_of(grant.id),
            )
            is None
        ]

    def describe(self, grant: Grant) -> dict:
        """A grant as the API shows it, with who approved and what is still missing."""
        approvals = self.store.approvals_of(grant.id)
        view = grant.as_json()
        if grant.approvals_required:
            policy = self.policy()
            missing = (
                policy.approval_progress(grant.entitlement, approvals)[1]
                if grant.status == PENDING and grant.entitlement in policy.entitlements
                else []
            )
            view["approvals"] = {
                "required": grant.approvals_required,
                "given": [{"by": a.display, "at": a.at} for a in approvals],
                "missing": missing,
            }
        if grant.status in AWAITING:
            view["expires_unapproved_at"] = grant.due_at
        return view

    def extend(
        self, principal: Principal, grant_id: str, extra: object, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        """Make a live window longer, within the policy's extension rules. A credential cannot
        outlive its own hard expiry (a token's explicit_max_ttl), so the longer window gets a new
        credential, shown once, and the old one is revoked. Were that revocation to fail, the old
        credential still dies at the old window end, which lies inside the new window."""
        if extra is None or extra == "":
            raise InvalidDuration("duration is required: how much longer (like 15m)")
        try:
            seconds = parse_duration(extra)
        except ValueError as exc:
            raise InvalidDuration(str(exc)) from None
        grant = self.get(principal, grant_id, owner_only=True)
        if grant.status != ACTIVE:
            raise GrantConflict(
                f"grant {grant.id} is {grant.status}: only an active grant can be extended"
            )
        self._refuse_if_unhealthy()
        policy = self.policy()
        start, end = parse_time(grant.window_start), parse_time(grant.window_end)
        decision = policy.evaluate_extension(
            principal, grant.entitlement, start, end, seconds, self.clock()
        )
        _raise_if_refused(decision)
        chosen = policy.entitlements[grant.entitlement]
        self._check_request(chosen, public_key)
        new_end = end + timedelta(seconds=seconds)
        backend = self.backends[chosen.backend]
        credential = backend.issue(grant.id, chosen, new_end, principal.display, public_key)
        try:
            with self.store.transaction() as tx:
                if not tx.move_grant(
                    grant.id,
                    ACTIVE,
                    handle=credential.handle,
                    window_end=isoformat(new_end),
                    duration=grant.duration + seconds,
                    credential_expires_at=isoformat(credential.expires_at),
                    due_at=_first_look(grant, new_end),
                    updated_at=self._now(),
                ):
                    raise GrantConflict(f"grant {grant.id} ended while it was being extended")
                self._log_decision(tx, principal, grant.id, decision, extension=seconds)
                self._log(
                    tx,
                    "extend",
                    principal.actor(),
                    grant.id,
                    window_end_was=grant.window_end,
                    window_end=isoformat(new_end),
                    backend=chosen.backend,
                    **self._marks(backend, credential.handle),
                    replaces=self._fingerprint(grant.handle),
                    **credential.details,
                )
        except Exception:
            backend.revoke(credential.handle)  # no record of it, so it must not exist
            raise
        self._remove_replaced(grant, backend)
        self.on_change()
        return self.store.get_grant(grant.id), credential

    def _remove_replaced(self, grant: Grant, backend) -> None:
        """Revoke the credential an extension replaced. Should that fail, it still dies at the
        old window end, inside the new window; the chain records what happened either way."""
        if not backend.revocable:
            with self.store.transaction() as tx:
                self._log(
                    tx,
                    "replaced",
                    REAPER,
                    grant.id,
                    handle=self._fingerprint(grant.handle),
                    revocable=False,
                    valid_until=grant.window_end,
                )
            return
        outcome = self._remove(backend, grant.handle)
        with self.store.transaction() as tx:
            self._log_removal(tx, grant, backend, outcome, replaced=True)

    def _remove(self, backend, handle: str) -> Removal:
        """Revoke, then verify even when the revoke call failed: Vault's own expiry may have
        removed it in the same instant, and what counts is whether the credential is gone, not
        who removed it."""
        return Removal(
            _failure_of(backend.revoke, handle),
            _failure_of(backend.is_gone, handle, want=True),
        )

    def _log_removal(
        self, tx: Transaction, grant: Grant, backend, outcome: Removal, **context
    ) -> None:
        revoke_error, verify_error = outcome
        marks = self._marks(backend, grant.handle)
        self._log(
            tx,
            "revoke",
            REAPER,
            grant.id,
            **marks,
            accepted=not revoke_error,
            error=revoke_error or None,
            **context,
        )
        self._log(
            tx,
            "verify",
            REAPER,
            grant.id,
            **marks,
            gone=not verify_error,
            method=backend.verify_method,
            error=verify_error or None,
            **context,
        )

    # --- ending -----------------------------------------------------------------------------

    def release(self, principal: Principal, grant_id: str) -> Grant:
        """End the window now; the reaper, woken at once, removes and verifies. A credential
        nothing can revoke (its backend says `revocable = False`) stays valid until its own
        expiry: the release records the end, and the reaper looks (and verifies) only then."""
        grant = self.get(principal, grant_id, owner_only=True)
        now = self._now()
        revocable = getattr(self.backends.get(grant.backend), "revocable", True)
        due = now if revocable else max(now, grant.credential_expires_at or now)
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id, ACTIVE, status=RELEASED, window_end=now, due_at=due, updated_at=now
            ):
                current = tx.get_grant(grant.id)
                raise GrantConflict(f"grant {grant.id} is {current.status}, not active")
            self._log(
                tx,
                "release",
                principal.actor(),
                grant.id,
                window_end_was=grant.window_end,
                window_end=now,
                credential_valid_until=None if revocable else due,
            )
        self.on_change()
        return self.store.get_grant(grant.id)

    def reap_due(self, now: datetime | None = None) -> datetime | None:
        """Remove every credential whose window has closed; return when the next one closes."""
        now = now or self.clock()
        while True:
            due = self.store.due_grants(isoformat(now), limit=REAP_BATCH)
            for grant in due:
                self._reap(grant, now)
            if len(due) < REAP_BATCH:
                break
        deadline = self.store.next_deadline()
        return parse_time(deadline) if deadline else None

    def _reap(self, grant: Grant, now: datetime) -> None:
        if grant.status in AWAITING:
            self._expire_unapproved(grant)
            return
        if grant.status == ACTIVE and parse_time(grant.window_end) > now:
            self._warn_of_expiry(grant, now)
            return
        attempt = grant.attempts + 1
        if not self._claim_for_removal(grant, now, attempt):
            return
        backend = self.backends[grant.backend]
        outcome = self._remove(backend, grant.handle)
        with self.store.transaction() as tx:
            self._log_removal(tx, grant, backend, outcome, attempt=attempt)
            if outcome.gone:
                tx.move_grant(
                    grant.id,
                    REVOKING,
                    status=REVOKED,
                    due_at="",
                    last_error="",
                    updated_at=self._now(),
                )
                return
            error = outcome.error
            backoff = min(self.retry_max, self.retry_min * 2 ** (attempt - 1))
            retry_at = isoformat(now + timedelta(seconds=backoff))
            tx.move_grant(
                grant.id,
                REVOKING,
                status=REVOKE_FAILED,
                last_error=error,
                due_at=retry_at,
                updated_at=self._now(),
            )
            self._log(
                tx,
                "revoke_failed",
                REAPER,
                grant.id,
                attempt=attempt,
                error=error,
                next_attempt_at=retry_at,
            )
        log.warning("grant %s: removal not verified (attempt %d): %s", grant.id, attempt, error)
        self.notify(
            "revoke_failed",
            f"Removal of {grant.entitlement} for {grant.requester} could "
            f"not be verified (attempt {attempt}): {error}. Retrying at {retry_at}.",
            grant_id=grant.id,
            audience="security",
        )

    def _claim_for_removal(self, grant: Grant, now: datetime, attempt: int) -> bool:
        """Move the grant to revoking; False when someone else moved it first."""
        with self.store.transaction() as tx:
            if grant.status == ACTIVE:
                if not tx.move_grant(grant.id, ACTIVE, status=EXPIRED, updated_at=self._now()):
                    return False
                self._log(tx, "expire", REAPER, grant.id, window_end=grant.window_end)
            return tx.move_grant(
                grant.id,
                TO_REAP,
                status=REVOKING,
                attempts=attempt,
                due_at=isoformat(now + REVOCATION_LEASE),
                updated_at=self._now(),
            )

    def _warn_of_expiry(self, grant: Grant, now: datetime) -> None:
        """Tell the requester the window closes soon; then look again at the window end."""
        with self.store.transaction() as tx:
            if not tx.move_grant(grant.id, ACTIVE, due_at=grant.window_end):
                return
        minutes = max(1, round((parse_time(grant.window_end) - now).total_seconds() / 60))
        self.notify(
            notify.EXPIRING,
            notify.expiring_text(grant, minutes),
            grant_id=grant.id,
            audience="requester",
        )

    def _expire_unapproved(self, grant: Grant) -> None:
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id, grant.status, status=EXPIRED_UNAPPROVED, due_at="", updated_at=self._now()
            ):
                return
            self._log(
                tx,
                "expire_unapproved",
                REAPER,
                grant.id,
                was=grant.status,
                waited_until=grant.due_at,
            )
        self.notify(
            "expired_unapproved",
            f"Your request for {grant.entitlement} expired "
            f"before it was {'activated' if grant.status == APPROVED else 'approved'}.",
            grant_id=grant.id,
            audience="requester",
        )

    # --- reconciling: what Vault holds against what the store records -------------------------

    def reconcile(self, now: datetime | None = None) -> list[dict]:
        """Ask every backend what Vault holds for this broker; revoke and verify each stray (a
        credential of no grant, of a grant that may hold none, or not the one its grant records),
        writing a `reconcile` entry for each. A grant left `issuing` past the grace period (the
        broker stopped between Vault's answer and the record) becomes `issue_failed`. Returns the
        findings as written to the chain."""
        now = now or self.clock()
        findings, seen = [], set()
        for backend in self.backends.values():
            for holding in backend.holdings():
                seen.add(holding.grant_id)
                grant = self.store.get_grant(holding.grant_id)
                why = self._stray(backend, holding, grant, now)
                if why and (grant is None or grant.status != ISSUING or self._abandon(grant, why)):
                    findings.append(self._remove_stray(backend, holding, grant, why))
        for grant in self.store.grants_in((ISSUING,)):
            if grant.id not in seen and self._stale(grant.updated_at, now):
                self._abandon(grant, "the broker stopped before Vault issued anything")
        return findings

    def _stray(self, backend, holding: Holding, grant: Grant | None, now: datetime) -> str:
        """Why `holding` is a stray ("" when it is not, or when it is not ours to judge)."""
        if grant is None:
            # A grant is recorded before Vault is asked, so an unknown id is never in flight.
            return "" if holding.legacy else "no grant of this broker has this id"
        if grant.status not in MAY_HOLD:
            return f"the grant is {grant.status}: it holds no credential"
        if grant.status == ISSUING:
            if self._stale(grant.updated_at, now):
                return "the grant was left issuing: the broker stopped before recording it"
            return ""  # an issuance in flight right now
        if backend.is_recorded(holding, grant.handle):
            return ""  # the reaper's to remove
        if holding.issued_at is not None and now - holding.issued_at < ISSUE_GRACE:
            return ""  # an extension's new credential, perhaps not recorded yet
        return f"the grant is {grant.status} with another credential (a replaced one left over)"

    def _stale(self, moment: str, now: datetime) -> bool:
        return not moment or now - parse_time(moment) >= ISSUE_GRACE

    def _abandon(self, grant: Grant, why: str) -> bool:
        """Move a grant stuck in `issuing` to `issue_failed`; False if it moved on meanwhile."""
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id, ISSUING, status=ISSUE_FAILED, last_error=why, updated_at=self._now()
            ):
                return False
            self._log(tx, "issue_failed", REAPER, grant.id, backend=grant.backend, error=why)
        return True

    def _remove_stray(self, backend, holding: Holding, grant: Grant | None, why: str) -> dict:
        outcome = self._remove(backend, holding.handle)
        finding = {
            "backend": backend.kind,
            **self._marks(backend, holding.handle),
            "found": holding.description,
            "why": why,
            "grant_status": grant.status if grant else None,
            "accepted": not outcome.revoke_error,
            "gone": outcome.gone,
            "method": backend.verify_method,
            "error": outcome.error or None,
        }
        with self.store.transaction() as tx:
            self._log(tx, "reconcile", REAPER, holding.grant_id, **finding)
        log_at = log.info if outcome.gone else log.warning
        log_at(
            "reconcile: stray %s credential of grant %s: %s", backend.kind, holding.grant_id, why
        )
        return {"grant_id": holding.grant_id, **finding}

    # --- health: the broker fails closed --------------------------------------------------------

    def health(self, deep: bool = False) -> dict:
        """What issuing depends on: the audit log can be written, and the reaper is alive. With
        `deep`, also what operators must hear about: Vault, and removals not yet verified."""
        checks = {"store": self._store_check(), "reaper": self._reaper_check()}
        if deep:
            failed = self.store.grants_in((REVOKE_FAILED,))
            checks["revoke_failed"] = {
                "ok": not failed,
                "count": len(failed),
                "grants": [grant.id for grant in failed],
            }
            if self.vault_health is not None:
                checks["vault"] = self.vault_health()
            overdue = self.store.reviews_overdue(self._now())
            # Informational: a missed review is for people to chase, not a reason to stop.
            checks["reviews"] = {"ok": True, "overdue": len(overdue), "grants": overdue}
        return checks

    def _refuse_if_unhealthy(self) -> None:
        problems = [check["error"] for check in self.health().values() if not check["ok"]]
        if problems:
            raise BrokerUnhealthy("the broker issues nothing new now: " + "; ".join(problems))

    def _store_check(self) -> dict:
        try:
            self.store.check_writable()
        except Exception as exc:
            return {"ok": False, "error": f"the audit log cannot be written: {exc}"}
        return {"ok": True}

    def _reaper_check(self) -> dict:
        if self.heartbeat is None:
            return {"ok": True, "enabled": False}
        beat = self.heartbeat()
        if beat is None:
            return {"ok": False, "alive": False, "error": "the reaper is not running"}
        age = (self.clock() - beat).total_seconds()
        check = {"ok": True, "alive": True, "heartbeat_age": round(age, 1)}
        if age > 3 * self.heartbeat_every:
            check.update(ok=False, error=f"the reaper's heartbeat is {age:.0f}s old")
        return check

    def chain(self, grant_id: str) -> list[dict]:
        return list(self.store.audit_entries(grant_id))

    def _now(self) -> str:
        return isoformat(self.clock())

    def _fingerprint(self, handle: str) -> str:
        return audit.fingerprint(self.fingerprint_key, handle)

    def _marks(self, backend, handle: str) -> dict:
        """What the log keeps of a credential's handle and of each name it goes by (accessor,
        lease id, database user, serial): HMACs, which `jit audit lookup` matches and nobody can
        read back."""
        names = backend.identifiers(handle) if handle else {}
        return {
            "handle": self._fingerprint(handle),
            "identifiers": {name: self._fingerprint(value) for name, value in names.items()},
        }

    def _log(self, tx: Transaction, type_: str, actor: dict, grant_id: str, **data) -> None:
        tx.append(self._now(), type_, actor, grant_id, data)


class Removal(NamedTuple):
    """What went wrong revoking a credential and verifying it gone ("" for nothing)."""

    revoke_error: str
    verify_error: str

    @property
    def gone(self) -> bool:
        return not self.verify_error

    @property
    def error(self) -> str:
        return "; ".join(dict.fromkeys(e for e in self if e))


def _failure_of(step: Callable, handle: str, want: object = None) -> str:
    """Run one removal step; return what went wrong ("" when it did what was wanted), so the
    reaper records it and retries rather than dying on one grant's surprise."""
    try:
        result = step(handle)
    except BrokerError as exc:
        return exc.detail
    except Exception as exc:
        log.exception("removal step %s failed", getattr(step, "__name__", step))
        return f"{type(exc).__name__}: {exc}"
    if want is not None and result != want:
        return "Vault still knows the credential after revocation"
    return ""


def _first_look(grant: Grant, end: datetime | None = None) -> str:
    """An active grant is looked at first to warn its requester, if the window is long enough."""
    end = end or parse_time(grant.window_end)
    if end - parse_time(grant.window_start) > 2 * EXPIRY_WARNING:
        return isoformat(end - EXPIRY_WARNING)
    return isoformat(end)


def _validated(
    entitlement: object, duration: object, reason: object, ticket: object
) -> tuple[str, int | None, str, str]:
    """Shape checks only; what the policy demands (lengths, patterns, maxima) is policy.py's."""
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


def _raise_refusal(refusal) -> None:
    if refusal is not None:
        raise PolicyRefused(refusal.code, refusal.message)
