"""Failing closed: issuing needs a writable audit log and a live reaper; `/readyz` also hears
about Vault, a reaper that is behind, unverified removals and overdue reviews."""

from __future__ import annotations

from ..errors import (
    BrokerUnhealthy,
    StoreUnavailable,
)
from ..models import (
    REVOKE_FAILED,
    parse_time,
    utcnow,
)
from .base import (
    GrantsBase,
)


class Health(GrantsBase):
    def health(self, deep: bool = False) -> dict:
        """What issuing depends on: the audit log can be written, and the reaper is alive. With
        `deep`, also what operators must hear about: Vault, deadlines the reaper is late for,
        and removals not yet verified."""
        checks = {"store": self._store_check(), "reaper": self._reaper_check()}
        if deep:
            checks["reaper_lag"] = self._reaper_lag_check()
            checks["revoke_failed"] = self._revoke_failed_check()
            if self.vault_health is not None:
                checks["vault"] = self.vault_health()
            checks["reviews"] = self._reviews_check()
        return checks

    def liveness(self) -> dict:
        """For /healthz: the one thing a restart mends, a reaper that died or hangs."""
        return self._reaper_check()

    def _reaper_lag_check(self) -> dict:
        """How late the reaper is for the oldest deadline (a window end, a retry): a replica this
        far behind should not take more work."""
        if self.heartbeat is None:
            return {"ok": True, "enabled": False}
        try:
            deadline = self.store.next_deadline()
        except StoreUnavailable as exc:
            return {"ok": False, "error": f"the reaper's deadlines cannot be read: {exc.detail}"}
        late = 0.0 if deadline is None else (self.clock() - parse_time(deadline)).total_seconds()
        check: dict[str, object] = {"ok": late <= self.behind_after, "late": round(max(late, 0), 1)}
        if not check["ok"]:
            check["error"] = f"the reaper is {late:.0f}s late for its oldest deadline"
        return check

    def _revoke_failed_check(self) -> dict:
        """An alert, not a reason to take the broker out of service: every replica would fail it
        at once. The webhook and the metric carry it too."""
        try:
            failed = self.store.grants_in((REVOKE_FAILED,))
        except StoreUnavailable as exc:  # unknown is not "none": removals may be unverified
            return {"ok": False, "error": f"unverified removals cannot be read: {exc.detail}"}
        return {"ok": not failed, "count": len(failed), "grants": [grant.id for grant in failed]}

    def _reviews_check(self) -> dict:
        """Informational: a missed review is for people to chase, not a reason to stop."""
        try:
            overdue = self.store.reviews_overdue(self._now())
        except StoreUnavailable as exc:
            return {"ok": True, "error": f"overdue reviews cannot be read: {exc.detail}"}
        return {"ok": True, "overdue": len(overdue), "grants": overdue}

    def _refuse_if_unhealthy(self) -> None:
        """Before a request, an activation or an extension: no live reaper, nothing new. That
        the audit log can be written needs no check of its own here: each of them commits its
        record (the request, the claim) before Vault is asked, and a store that cannot commit
        refuses it there (503 store_unavailable) with nothing issued."""
        reaper = self._reaper_check()
        if not reaper["ok"]:
            raise BrokerUnhealthy(f"the broker issues nothing new now: {reaper['error']}")

    def _store_check(self) -> dict:
        """A real commit, on every /readyz: cheap (one row), and the proof that the audit
        entries of what a replica is about to issue can be recorded."""
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
        # The heartbeat is this process's own, stamped by its own clock (not the store's, which
        # may be out of reach just when /healthz must say so).
        age = (utcnow() - beat).total_seconds()
        check: dict[str, object] = {"ok": True, "alive": True, "heartbeat_age": round(age, 1)}
        if age > 3 * self.heartbeat_every:
            check.update(ok=False, error=f"the reaper's heartbeat is {age:.0f}s old")
        return check
