"""The reconciler: what Vault holds for this broker without a live grant to account for it
(a crash between Vault's answer and the record, a replaced credential) is revoked, verified
gone, and written to the chain. What a dead broker process left in flight is settled at once
(the reaper reconciles when it starts): a grant left `issuing`, and the credential an extension's
claim got from Vault but never recorded. Work whose process lives, or that was recorded before
processes were stamped, gets ISSUE_GRACE, since it may be in flight."""

from __future__ import annotations

from datetime import datetime

from ..audit.events import Entry
from ..backends import Backend
from ..models import (
    ISSUE_FAILED,
    ISSUING,
    Credential,
    Grant,
    Holding,
)
from .base import (
    ISSUE_GRACE,
    MAY_HOLD,
    REAPER,
    log,
)
from .removal import Removing

LEFT_BY_THE_DEAD = "an extension's new credential, left unrecorded by a broker process that died"


class Reconciling(Removing):
    """Needs Removing: a stray is removed and verified as any credential is."""

    def reconcile(self, now: datetime | None = None) -> list[dict]:
        """Ask every backend what Vault holds for this broker; revoke and verify each stray (a
        credential of no grant, of a grant that may hold none, or not the one its grant records),
        writing a `reconcile` entry for each. A grant left `issuing` (the broker stopped between
        Vault's answer and the record) becomes `issue_failed`. Returns the findings as written
        to the chain."""
        now = now or self.clock()
        findings, seen = [], set()
        for backend in self.backends.values():
            for holding in backend.holdings():
                seen.add(holding.grant_id)
                grant = self.store.get_grant(holding.grant_id)
                why = self._stray(backend, holding, grant, now)
                if why and self._ours_to_remove(grant, holding, why):
                    findings.append(self._remove_stray(backend, holding, grant, why))
        for grant in self.store.grants_in((ISSUING,)):
            if grant.id not in seen and self._left_behind(grant, now):
                self._abandon(grant, "the broker stopped before Vault issued anything")
        return findings

    def _stray(self, backend: Backend, holding: Holding, grant: Grant | None, now: datetime) -> str:
        """Why `holding` is a stray ("" when it is not, or when it is not ours to judge)."""
        if grant is None:
            # A grant is recorded before Vault is asked, so an unknown id is never in flight.
            return "" if holding.legacy else "no grant of this broker has this id"
        if grant.status not in MAY_HOLD:
            return f"the grant is {grant.status}: it holds no credential"
        if grant.status == ISSUING:
            if self._left_behind(grant, now):
                return "the grant was left issuing: the broker stopped before recording it"
            return ""  # an issuance in flight right now
        listed = self.store.credentials_of(grant.id)
        if any(
            backend.is_recorded(holding, held.handle)
            for held in listed
            if held.handle and not held.gone_at
        ):
            return ""  # on the grant's list, not yet removed: the reaper's to remove
        if self._left_by_the_dead(listed):
            return LEFT_BY_THE_DEAD  # no extension of this grant is in flight: at once
        if holding.issued_at is not None and now - holding.issued_at < ISSUE_GRACE:
            return ""  # an extension's new credential, perhaps not recorded yet
        return f"the grant is {grant.status} with another credential (a replaced one left over)"

    def _left_behind(self, grant: Grant, now: datetime) -> bool:
        """Whether an `issuing` grant is no longer in flight (see `_abandoned`)."""
        return self._abandoned(grant.issuing_process, grant.updated_at, now)

    def _left_by_the_dead(self, listed: list[Credential]) -> list[Credential]:
        """The grant's open extension claims when every one was made by a dead process (so
        nothing Vault holds for the grant unrecorded can be on its way to the record); else []."""
        claims = [held for held in listed if not held.handle and not held.gone_at]
        return claims if all(self._dead(claim.issuing_process) for claim in claims) else []

    def _ours_to_remove(self, grant: Grant | None, holding: Holding, why: str) -> bool:
        """Settle the grant's own record before its stray goes, conditional on what it replaces:
        False when another sweep got there first (and removes the stray itself)."""
        if grant is None:
            return True
        if grant.status == ISSUING:
            return self._abandon(grant, why)
        if why == LEFT_BY_THE_DEAD:
            return self._adopt(grant, holding)
        return True

    def _adopt(self, grant: Grant, holding: Holding) -> bool:
        """Put the credential a dead process's extension left on the grant's list, in its claim's
        place: until its removal is verified, the grant cannot be `revoked` (the reaper retries
        it), and once verified the claim is closed. Read again under the write lock: False when
        another sweep took the claim, or this credential, first."""
        with self.store.transaction() as tx:
            listed = tx.credentials_of(grant.id)
            claims = self._left_by_the_dead(listed)
            if not claims or any(held.handle == holding.handle for held in listed):
                return False
            tx.record_handle(claims[0].id, holding.handle)
        return True

    def _abandon(self, grant: Grant, why: str) -> bool:
        """Move a grant stuck in `issuing` to `issue_failed`; False if it moved on meanwhile."""
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id, ISSUING, status=ISSUE_FAILED, last_error=why, updated_at=self._now()
            ):
                return False
            self._log(tx, Entry.ISSUE_FAILED, REAPER, grant.id, backend=grant.backend, error=why)
        return True

    def _remove_stray(
        self, backend: Backend, holding: Holding, grant: Grant | None, why: str
    ) -> dict:
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
            self._log(tx, Entry.RECONCILE, REAPER, holding.grant_id, **finding)
            if outcome.gone:  # when it is on the grant's list, it holds the grant back no more
                tx.mark_gone(holding.grant_id, holding.handle, self._now())
        log_at = log.info if outcome.gone else log.warning
        log_at(
            "reconcile: stray %s credential of grant %s: %s", backend.kind, holding.grant_id, why
        )
        return {"grant_id": holding.grant_id, **finding}
