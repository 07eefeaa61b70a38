"""The use cases: request, release, reap. The one place that changes a grant's state, and every
change is written with its audit entries in the same transaction."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from . import audit
from .durations import parse_duration
from .errors import (
    BrokerError,
    DurationTooLong,
    GrantConflict,
    GrantNotFound,
    InvalidDuration,
    InvalidRequest,
    NotEligible,
    UnknownEntitlement,
)
from .models import (
    ACTIVE,
    EXPIRED,
    ISSUE_FAILED,
    ISSUING,
    RELEASED,
    REVOKE_FAILED,
    REVOKED,
    REVOKING,
    TO_REAP,
    Decision,
    Grant,
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
REAP_BATCH = 200
REVOCATION_LEASE = timedelta(seconds=60)  # a crash mid-revocation is retried after this
DENIALS = {
    "unknown_entitlement": UnknownEntitlement,
    "not_eligible": NotEligible,
    "duration_too_long": DurationTooLong,
}


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
    ):
        self.store = store
        self.policy = policy
        self.backends = backends
        self.fingerprint_key = fingerprint_key
        self.on_change = on_change  # the reaper's wake-up
        self.clock = clock
        self.retry_min, self.retry_max = retry_min, retry_max

    def eligible(self, principal: Principal) -> list[Entitlement]:
        return self.policy().eligible(principal)

    def request(
        self, principal: Principal, entitlement: object, duration: object, reason: object
    ) -> tuple[Grant, IssuedCredential]:
        """Check, record the intent, issue, record the result. Bad input leaves no trace; a Vault
        failure leaves a grant marked issue_failed, never one that claims a credential."""
        entitlement, seconds, reason = _validated(entitlement, duration, reason)
        policy = self.policy()
        decision = policy.evaluate(principal, entitlement, seconds)
        if not decision.allowed:
            raise DENIALS[decision.error](decision.reasons[0], reasons=decision.reasons)
        chosen = policy.entitlements[entitlement]
        grant = self._record_intent(principal, chosen, seconds, reason, decision)
        credential = self._issue(principal, grant, chosen)
        self.on_change()
        return self.store.get_grant(grant.id), credential

    def _record_intent(
        self,
        principal: Principal,
        chosen: Entitlement,
        seconds: int,
        reason: str,
        decision: Decision,
    ) -> Grant:
        start = self.clock().replace(microsecond=0)
        grant = Grant(
            id=str(uuid.uuid4()),
            requester_iss=principal.issuer,
            requester_sub=principal.subject,
            requester=principal.display,
            entitlement=chosen.name,
            reason=reason,
            duration=seconds,
            status=ISSUING,
            created_at=isoformat(start),
            window_start=isoformat(start),
            window_end=isoformat(start + timedelta(seconds=seconds)),
            backend=chosen.backend,
            policy_hash=decision.policy_hash,
            updated_at=isoformat(start),
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
                duration=seconds,
                reason=reason,
            )
            self._log(
                tx,
                "decision",
                principal.actor(),
                grant.id,
                allowed=True,
                reasons=list(decision.reasons),
                policy_hash=decision.policy_hash,
            )
        return grant

    def _issue(self, principal: Principal, grant: Grant, chosen: Entitlement) -> IssuedCredential:
        backend = self.backends[chosen.backend]
        try:
            credential = backend.issue(
                grant.id, chosen.vault_policies, grant.window.end, principal.display
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
                tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=ACTIVE,
                    handle=credential.handle,
                    credential_expires_at=isoformat(credential.expires_at),
                    updated_at=self._now(),
                )
                self._log(
                    tx,
                    "issue",
                    principal.actor(),
                    grant.id,
                    backend=chosen.backend,
                    handle=self._fingerprint(credential.handle),
                    **credential.details,
                )
        except Exception:
            # No record of the credential means the credential must not exist either.
            backend.revoke(credential.handle)
            raise
        return credential

    def get(self, principal: Principal, grant_id: str) -> Grant:
        grant = self.store.get_grant(grant_id)
        if grant is None or not grant.owned_by(principal):
            raise GrantNotFound(f"no grant {grant_id} of yours")
        return grant

    def mine(self, principal: Principal) -> list[Grant]:
        return self.store.grants_of(principal.issuer, principal.subject)

    def release(self, principal: Principal, grant_id: str) -> Grant:
        """End the window now; the reaper, woken at once, removes and verifies."""
        grant = self.get(principal, grant_id)
        now = self._now()
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id,
                ACTIVE,
                status=RELEASED,
                window_end=now,
                next_attempt_at=now,
                updated_at=now,
            ):
                current = self.store.get_grant(grant.id)
                raise GrantConflict(f"grant {grant.id} is {current.status}, not active")
            self._log(
                tx,
                "release",
                principal.actor(),
                grant.id,
                window_end_was=grant.window_end,
                window_end=now,
            )
        self.on_change()
        return self.store.get_grant(grant.id)

    def reap_due(self, now: datetime | None = None) -> datetime | None:
        """Remove every credential whose window has closed; return when the next one closes."""
        now = now or self.clock()
        while True:
            due = self.store.due_grants(isoformat(now), TO_REAP, limit=REAP_BATCH)
            for grant in due:
                self._reap(grant, now)
            if len(due) < REAP_BATCH:
                break
        deadline = self.store.next_deadline(TO_REAP)
        return parse_time(deadline) if deadline else None

    def _reap(self, grant: Grant, now: datetime) -> None:
        attempt = grant.attempts + 1
        if not self._claim_for_removal(grant, now, attempt):
            return
        backend = self.backends[grant.backend]
        handle = self._fingerprint(grant.handle)
        # Verify even when the revoke call failed: Vault's own expiry may have removed it in the
        # same instant, and what counts is whether the credential is gone, not who removed it.
        revoke_error = _failure_of(backend.revoke, grant.handle)
        verify_error = _failure_of(backend.is_gone, grant.handle, want=True)
        gone = not verify_error
        with self.store.transaction() as tx:
            self._log(
                tx,
                "revoke",
                REAPER,
                grant.id,
                attempt=attempt,
                handle=handle,
                accepted=not revoke_error,
                error=revoke_error or None,
            )
            self._log(
                tx,
                "verify",
                REAPER,
                grant.id,
                attempt=attempt,
                handle=handle,
                gone=gone,
                method=backend.verify_method,
                error=verify_error or None,
            )
            if gone:
                tx.move_grant(
                    grant.id,
                    REVOKING,
                    status=REVOKED,
                    next_attempt_at="",
                    last_error="",
                    updated_at=self._now(),
                )
                return
            error = "; ".join(dict.fromkeys(e for e in (revoke_error, verify_error) if e))
            backoff = min(self.retry_max, self.retry_min * 2 ** (attempt - 1))
            retry_at = isoformat(now + timedelta(seconds=backoff))
            tx.move_grant(
                grant.id,
                REVOKING,
                status=REVOKE_FAILED,
                last_error=error,
                next_attempt_at=retry_at,
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
                next_attempt_at=isoformat(now + REVOCATION_LEASE),
                updated_at=self._now(),
            )

    def chain(self, grant_id: str) -> list[dict]:
        return list(self.store.audit_entries(grant_id))

    def verify_chain(self) -> audit.Verification:
        return audit.verify(self.store.audit_entries())

    def _now(self) -> str:
        return isoformat(self.clock())

    def _fingerprint(self, handle: str) -> str:
        return audit.fingerprint(self.fingerprint_key, handle)

    def _log(self, tx: Transaction, type_: str, actor: dict, grant_id: str, **data) -> None:
        tx.append(self._now(), type_, actor, grant_id, data)


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


def _validated(entitlement: object, duration: object, reason: object) -> tuple[str, int, str]:
    if not isinstance(entitlement, str) or not entitlement.strip():
        raise InvalidRequest("entitlement is required")
    if duration is None or duration == "":
        raise InvalidDuration("duration is required (seconds, or like 30m, 2h, 1h30m)")
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise InvalidDuration(str(exc)) from None
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequest("reason is required: say what the access is for")
    if len(reason) > MAX_REASON:
        raise InvalidRequest(f"reason is longer than {MAX_REASON} characters")
    return entitlement.strip(), seconds, reason.strip()
