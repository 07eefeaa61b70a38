"""Failing closed: issuing needs a writable audit log and a live reaper; `/healthz` also hears
about Vault, unverified removals and overdue reviews."""

from __future__ import annotations

from ..errors import (
    BrokerUnhealthy,
    StoreUnavailable,
)
from ..models import (
    REVOKE_FAILED,
    utcnow,
)
from .base import (
    GrantsBase,
)


class Health(GrantsBase):
    def health(self, deep: bool = False) -> dict:
        """What issuing depends on: the audit log can be written, and the reaper is alive. With
        `deep`, also what operators must hear about: Vault, and removals not yet verified."""
        checks = {"store": self._store_check(), "reaper": self._reaper_check()}
        if deep:
            checks["revoke_failed"] = self._revoke_failed_check()
            if self.vault_health is not None:
                checks["vault"] = self.vault_health()
            checks["reviews"] = self._reviews_check()
        return checks

    def _revoke_failed_check(self) -> dict:
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
        problems = [check["error"] for check in self.health().values() if not check["ok"]]
        if problems:
            raise BrokerUnhealthy("the broker issues nothing new now: " + "; ".join(problems))

    def _store_check(self) -> dict:
        """A real commit, before every issuance and on every /healthz: cheap (one row), and the
        only proof that the audit entries of what is about to be issued can be recorded."""
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
