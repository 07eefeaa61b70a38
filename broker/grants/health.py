"""Failing closed: issuing needs a writable audit log and a live reaper; `/healthz` also hears
about Vault, unverified removals and overdue reviews."""

from __future__ import annotations

from ..errors import (
    BrokerUnhealthy,
)
from ..models import (
    REVOKE_FAILED,
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
