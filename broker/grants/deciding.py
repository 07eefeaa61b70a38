"""People deciding on grants: approvals and denials (never by the requester), the requester
cancelling, and the mandatory review of a break-glass grant. Each decision is checked and written
under the write lock, so racing deciders are counted in turn."""

from __future__ import annotations

from .. import notify
from ..audit.events import Entry
from ..errors import (
    GrantConflict,
    GrantNotFound,
    InvalidRequest,
    PolicyRefused,
)
from ..models import (
    APPROVED,
    CANCELLED,
    DENIED,
    PENDING,
    Approval,
    Grant,
    Principal,
    isoformat,
)
from ..store import Transaction
from .base import (
    AWAITING,
    REVIEW_OUTCOMES,
    GrantsBase,
    _raise_refusal,
    _short_text,
)


class Deciding(GrantsBase):
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
                    grant.entitlement, approver, grant.requester_person, approvals
                )
            )
            approval = Approval(
                approver.issuer,
                approver.subject,
                approver.display,
                approver.groups,
                self._now(),
                email=approver.person.email,
            )
            if not tx.add_approval(grant.id, approval):
                raise PolicyRefused("already_approved", "you have already approved this request")
            satisfied, missing = policy.approval_progress(grant.entitlement, [*approvals, approval])
            self._log(
                tx,
                Entry.APPROVAL,
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
        grant = self._current(grant.id)
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
            refusal = policy.check_approver(grant.entitlement, approver, grant.requester_person, [])
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
                tx,
                Entry.DENIAL,
                approver.actor(),
                grant.id,
                approver=approver.claims(),
                reason=reason,
            )
        grant = self._current(grant.id)
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
                    f"request {grant.id} is {self._current(grant.id, tx).status}: "
                    "only a pending or approved request can be cancelled"
                )
            self._log(tx, Entry.CANCEL, principal.actor(), grant.id)
        self.on_change()
        return self._current(grant.id)

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
                    grant.requester_person,
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
                Entry.REVIEW,
                reviewer.actor(),
                grant.id,
                reviewer=reviewer.claims(),
                outcome=outcome,
                notes=notes,
                review_due=grant.review_due,
                late=now > grant.review_due or None,
            )
        return self._current(grant.id)
