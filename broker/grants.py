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
    Grant,
    IssuedCredential,
    Principal,
    isoformat,
    parse_time,
    utcnow,
)
from .policy import Entitlement, Policy
from .store import Store

log = logging.getLogger(__name__)

REAPER = {"iss": "jit-broker", "sub": "reaper"}
MAX_REASON = 1000
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
        self.on_change = on_change
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
        start = self.clock().replace(microsecond=0)
        end = start + timedelta(seconds=seconds)
        grant = Grant(
            id=str(uuid.uuid4()),
            requester_iss=principal.issuer,
            requester_sub=principal.subject,
            requester=principal.display,
            entitlement=entitlement,
            reason=reason,
            duration=seconds,
            status=ISSUING,
            created_at=isoformat(start),
            window_start=isoformat(start),
            window_end=isoformat(end),
            backend=chosen.backend,
            policy_hash=decision.policy_hash,
            updated_at=isoformat(start),
        )
        at = isoformat(start)
        with self.store.transaction() as tx:
            tx.insert_grant(grant)
            tx.append(
                at,
                "request",
                principal.actor(),
                grant.id,
                {
                    "principal": principal.claims(),
                    "entitlement": entitlement,
                    "duration": seconds,
                    "reason": reason,
                },
            )
            tx.append(
                at,
                "decision",
                principal.actor(),
                grant.id,
                {
                    "allowed": True,
                    "reasons": list(decision.reasons),
                    "policy_hash": decision.policy_hash,
                },
            )
        backend = self.backends[chosen.backend]
        try:
            credential = backend.issue(grant.id, chosen.vault_policies, end, principal.display)
        except BrokerError as exc:
            with self.store.transaction() as tx:
                tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=ISSUE_FAILED,
                    last_error=exc.detail,
                    updated_at=isoformat(self.clock()),
                )
                tx.append(
                    isoformat(self.clock()),
                    "issue_failed",
                    REAPER,
                    grant.id,
                    {"backend": chosen.backend, "error": exc.detail},
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
                    updated_at=isoformat(self.clock()),
                )
                tx.append(
                    isoformat(self.clock()),
                    "issue",
                    principal.actor(),
                    grant.id,
                    {
                        "backend": chosen.backend,
                        "handle": audit.fingerprint(self.fingerprint_key, credential.handle),
                        **credential.details,
                    },
                )
        except Exception:
            # No record of the credential means the credential must not exist either.
            backend.revoke(credential.handle)
            raise
        self.on_change()
        return self.store.get_grant(grant.id), credential

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
        now = isoformat(self.clock())
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
            tx.append(
                now,
                "release",
                principal.actor(),
                grant.id,
                {"window_end_was": grant.window_end, "window_end": now},
            )
        self.on_change()
        return self.store.get_grant(grant.id)

    def reap_due(self, now: datetime | None = None) -> datetime | None:
        """Remove every credential whose window has closed; return when the next one closes."""
        now = now or self.clock()
        while True:
            due = self.store.due_grants(isoformat(now), TO_REAP)
            for grant in due:
                self._reap(grant, now)
            if len(due) < 200:
                break
        deadline = self.store.next_deadline(TO_REAP)
        return parse_time(deadline) if deadline else None

    def _reap(self, grant: Grant, now: datetime) -> None:
        at, attempt = isoformat(now), grant.attempts + 1
        with self.store.transaction() as tx:
            if grant.status == ACTIVE:
                if not tx.move_grant(grant.id, ACTIVE, status=EXPIRED, updated_at=at):
                    return  # released or reaped by someone else meanwhile
                tx.append(at, "expire", REAPER, grant.id, {"window_end": grant.window_end})
            if not tx.move_grant(
                grant.id,
                TO_REAP,
                status=REVOKING,
                attempts=attempt,
                next_attempt_at=isoformat(now + REVOCATION_LEASE),
                updated_at=at,
            ):
                return
        backend = self.backends[grant.backend]
        handle = audit.fingerprint(self.fingerprint_key, grant.handle)
        revoke_error = _attempt(backend.revoke, grant.handle)
        gone, verify_error = False, ""
        if not revoke_error:
            outcome = _attempt(backend.is_gone, grant.handle, returns=True)
            gone = outcome is True
            if not gone:
                verify_error = outcome or "Vault still knows the credential after revocation"
        done = isoformat(self.clock())
        with self.store.transaction() as tx:
            tx.append(
                done,
                "revoke",
                REAPER,
                grant.id,
                {
                    "attempt": attempt,
                    "handle": handle,
                    "accepted": not revoke_error,
                    "error": revoke_error or None,
                },
            )
            if not revoke_error:
                tx.append(
                    done,
                    "verify",
                    REAPER,
                    grant.id,
                    {
                        "attempt": attempt,
                        "handle": handle,
                        "gone": gone,
                        "method": backend.verify_method,
                        "error": verify_error or None,
                    },
                )
            if gone:
                tx.move_grant(
                    grant.id,
                    REVOKING,
                    status=REVOKED,
                    next_attempt_at="",
                    last_error="",
                    updated_at=done,
                )
                return
            retry_at = now + timedelta(
                seconds=min(self.retry_max, self.retry_min * 2 ** (attempt - 1))
            )
            error = revoke_error or verify_error
            tx.move_grant(
                grant.id,
                REVOKING,
                status=REVOKE_FAILED,
                last_error=error,
                next_attempt_at=isoformat(retry_at),
                updated_at=done,
            )
            tx.append(
                done,
                "revoke_failed",
                REAPER,
                grant.id,
                {"attempt": attempt, "error": error, "next_attempt_at": isoformat(retry_at)},
            )
        log.warning("grant %s: removal not verified (attempt %d): %s", grant.id, attempt, error)

    def chain(self, grant_id: str) -> list[dict]:
        return list(self.store.audit_entries(grant_id))

    def verify_chain(self) -> audit.Verification:
        return audit.verify(self.store.audit_entries())


def _attempt(call: Callable, handle: str, returns: bool = False):
    """Run a removal step; a failure becomes its message (the reaper records it and retries)."""
    try:
        result = call(handle)
    except BrokerError as exc:
        return exc.detail
    except Exception as exc:  # the reaper must outlive any one grant's surprise
        log.exception("removal step %s failed", getattr(call, "__name__", call))
        return f"{type(exc).__name__}: {exc}"
    return result if returns else ""


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
