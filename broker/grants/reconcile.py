"""The reconciler: what Vault holds for this broker without a live grant to account for it
(a crash between Vault's answer and the record, a replaced credential) is revoked, verified
gone, and written to the chain. A grant left `issuing` by a broker process that is dead is
settled at once (the reaper reconciles when it starts); one whose process lives, or that was
recorded before processes were stamped, gets ISSUE_GRACE, since it may be in flight."""

from __future__ import annotations

from datetime import datetime

from ..models import (
    ISSUE_FAILED,
    ISSUING,
    Grant,
    Holding,
    parse_time,
)
from .base import (
    ISSUE_GRACE,
    MAY_HOLD,
    REAPER,
    GrantsBase,
    log,
)


class Reconciling(GrantsBase):
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
                if why and (grant is None or grant.status != ISSUING or self._abandon(grant, why)):
                    findings.append(self._remove_stray(backend, holding, grant, why))
        for grant in self.store.grants_in((ISSUING,)):
            if grant.id not in seen and self._left_behind(grant, now):
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
            if self._left_behind(grant, now):
                return "the grant was left issuing: the broker stopped before recording it"
            return ""  # an issuance in flight right now
        if any(
            backend.is_recorded(holding, held.handle)
            for held in self.store.credentials_of(grant.id)
            if held.handle and not held.gone_at
        ):
            return ""  # on the grant's list, not yet removed: the reaper's to remove
        if holding.issued_at is not None and now - holding.issued_at < ISSUE_GRACE:
            return ""  # an extension's new credential, perhaps not recorded yet
        return f"the grant is {grant.status} with another credential (a replaced one left over)"

    def _left_behind(self, grant: Grant, now: datetime) -> bool:
        """Whether an `issuing` grant is no longer in flight: the process that took it there is
        dead (known at once), or the grace period is over (a grant from before processes were
        stamped, or one a live process failed to finish)."""
        process = grant.issuing_process
        if process and self.processes is not None and not self.processes.is_alive(process):
            return True
        return self._stale(grant.updated_at, now)

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
