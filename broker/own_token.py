"""The broker's own Vault token: looked up at start, renewed from the reaper's loop once less than
half of its TTL (or period) is left, and reported on /readyz before it runs out. A token that
lapses silently stops every issuance and, worse, every revocation. The token itself is never
logged or shown."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import hvac
import hvac.exceptions
import requests

from .durations import format_duration
from .models import utcnow

log = logging.getLogger(__name__)

# A token that cannot be renewed degrades /readyz this long before it expires: time for a person
# to give the broker a new one.
WARN_BEFORE = timedelta(hours=24)
RETRY_AFTER = timedelta(seconds=30)  # after a failed lookup or renewal
FAILURES = (hvac.exceptions.VaultError, requests.RequestException)


def _reason(exc: Exception) -> str:
    if isinstance(exc, hvac.exceptions.Forbidden):
        return (
            "permission denied (its policy needs auth/token/lookup-self and "
            "auth/token/renew-self: `jit vault-policy` prints the current one)"
        )
    if isinstance(exc, requests.RequestException | hvac.exceptions.VaultDown):
        return f"Vault is unavailable ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _readable(left: timedelta) -> str:
    seconds = max(0, int(left.total_seconds()))
    return format_duration(seconds - seconds % 60 if seconds >= 60 else seconds)


class OwnToken:
    """What the broker knows of its token since the last lookup or renewal, and the step."""

    def __init__(
        self,
        client: hvac.Client,
        clock: Callable[[], datetime] = utcnow,
        warn_before: timedelta = WARN_BEFORE,
    ):
        self.client = client
        self.clock = clock
        self.warn_before = warn_before
        self.known = False  # looked up at least once
        self.expires_at: datetime | None = None  # None: the token has no TTL (root)
        self.full = timedelta(0)  # what a renewal restores: the period, or the TTL it was made with
        self.renewable = False  # False too once renewals stop restoring it (a max TTL is near)
        self.error = ""  # the last lookup's or renewal's failure, until one succeeds
        self._retry_at: datetime | None = None
        self._warned = False

    def look_up(self, now: datetime | None = None) -> None:
        """lookup-self: at start, so /readyz knows the token before the first renewal."""
        now = now or self.clock()
        try:
            data = self.client.auth.token.lookup_self()["data"]
        except FAILURES as exc:
            self._failed(now, f"the broker's Vault token could not be looked up: {_reason(exc)}")
            return
        ttl = int(data.get("ttl") or 0)
        self.known, self.error, self._retry_at = True, "", None
        self.expires_at = now + timedelta(seconds=ttl) if ttl else None
        self.full = timedelta(seconds=int(data.get("period") or data.get("creation_ttl") or ttl))
        self.renewable = bool(data.get("renewable"))
        self._warn_if_expiring(now)

    def renew_if_due(self, now: datetime | None = None) -> float | None:
        """One step of the reaper's loop: renew-self when less than half of the token's TTL is
        left. Returns the seconds until the next step has something to do (None: nothing will)."""
        now = now or self.clock()
        if self._retry_at is not None and now < self._retry_at:
            return (self._retry_at - now).total_seconds()
        if not self.known:
            self.look_up(now)
            if not self.known:
                return RETRY_AFTER.total_seconds()
        if self.expires_at is None:
            return None
        if not self.renewable:
            self._warn_if_expiring(now)
            return None
        due = self.expires_at - self.full / 2
        if now < due:
            return (due - now).total_seconds()
        try:
            auth = self.client.auth.token.renew_self()["auth"]
        except FAILURES as exc:
            left = _readable(self.expires_at - now)
            self._failed(
                now, f"renewing the broker's Vault token failed ({left} left): {_reason(exc)}"
            )
            return RETRY_AFTER.total_seconds()
        lease = timedelta(seconds=int(auth["lease_duration"]))
        self.expires_at, self.error, self._retry_at = now + lease, "", None
        # A renewal that gives back less than half is capped by a max TTL: renewing again gains
        # nothing, so it is reported (below, and on /readyz) instead.
        self.renewable = bool(auth.get("renewable")) and lease >= self.full / 2
        log.info("renewed the broker's Vault token: %s left", _readable(lease))
        if not self.renewable:
            self._warn_if_expiring(now)
            return None
        return (self.expires_at - self.full / 2 - now).total_seconds()

    def health(self, now: datetime | None = None) -> dict:
        """Part of /readyz's `vault` check: not ok after a failed lookup or renewal, or when the
        token runs out within `warn_before` and cannot be renewed. No TTL is fine."""
        if self.error:
            return {"ok": False, "error": self.error}
        if self.expires_at is None:
            return {"ok": True, "ttl": None}
        left = self.expires_at - (now or self.clock())
        check: dict[str, object] = {
            "ok": True,
            "ttl": max(0, int(left.total_seconds())),
            "renewable": self.renewable,
        }
        problem = self._expiring(left)
        if problem:
            check.update(ok=False, error=problem)
        return check

    def _expiring(self, left: timedelta) -> str:
        if self.expires_at is None or self.renewable or left >= self.warn_before:
            return ""
        if left <= timedelta(0):
            return "the broker's Vault token has expired and cannot be renewed"
        return f"the broker's Vault token expires in {_readable(left)} and cannot be renewed"

    def _warn_if_expiring(self, now: datetime) -> None:
        if self.expires_at is None:
            return
        problem = self._expiring(self.expires_at - now)
        if problem and not self._warned:
            log.warning("%s: give the broker a new token ([vault] token)", problem)
        self._warned = bool(problem)

    def _failed(self, now: datetime, error: str) -> None:
        self.error, self._retry_at = error, now + RETRY_AFTER
        log.warning("%s; trying again in %ss", error, int(RETRY_AFTER.total_seconds()))
