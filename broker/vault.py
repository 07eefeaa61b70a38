"""Credential backends over one hvac client: each issues, revokes and verifies one kind of
credential. The only module that talks to Vault; hvac and network errors become broker errors
here."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps

import hvac
import hvac.exceptions
import requests

from .errors import VaultRejected, VaultUnavailable
from .models import IssuedCredential, isoformat, utcnow

CALL_LATENCY = timedelta(milliseconds=250)
UNREACHABLE = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    requests.ConnectionError,
    requests.Timeout,
)


def translate_errors(call: Callable) -> Callable:
    """Vault down, sealed or unreachable is VaultUnavailable (503) to everything above."""

    @wraps(call)
    def wrapper(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except UNREACHABLE as exc:
            raise VaultUnavailable(f"Vault is unavailable: {type(exc).__name__}") from exc
        except hvac.exceptions.Forbidden as exc:
            raise VaultUnavailable(
                "the broker's Vault token was refused (permission denied)"
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise VaultRejected(f"Vault refused the call: {exc}") from exc

    return wrapper


def _is_unknown_accessor(exc: hvac.exceptions.VaultError) -> bool:
    return isinstance(exc, hvac.exceptions.InvalidRequest) and "invalid accessor" in str(exc)


class VaultTokenBackend:
    """A Vault token holding the entitlement's policies. Orphaned (outlives nothing of the
    broker's), not renewable, and `explicit_max_ttl` ends it at the window end even if the broker
    dies."""

    kind = "vault_token"
    verify_method = "Vault no longer knows the token's accessor"

    def __init__(self, client: hvac.Client):
        self.client = client

    @translate_errors
    def issue(
        self, grant_id: str, policies: tuple[str, ...], window_end: datetime, requester: str
    ) -> IssuedCredential:
        # Vault counts a token's life in whole seconds from its creation second. Measuring from
        # the second Vault will see (allowing for the call's latency) makes the token end on the
        # window's last second or just before it, never after it.
        ttl = int((window_end - (utcnow() + CALL_LATENCY).replace(microsecond=0)).total_seconds())
        if ttl <= 0:
            raise VaultUnavailable("the window closed before Vault could issue the token")
        response = self.client.auth.token.create_orphan(
            policies=list(policies),
            ttl=f"{ttl}s",
            explicit_max_ttl=f"{ttl}s",
            renewable=False,
            display_name=f"jit-{grant_id}",
            meta={"jit_grant_id": grant_id, "jit_requester": requester},
        )
        auth = response["auth"]
        expires_at = utcnow().replace(microsecond=0) + timedelta(seconds=auth["lease_duration"])
        return IssuedCredential(
            secret=auth["client_token"],
            handle=auth["accessor"],
            expires_at=min(expires_at, window_end),
            kind=self.kind,
            details={
                "policies": auth["policies"],
                "ttl": auth["lease_duration"],
                "renewable": auth["renewable"],
                "vault_request_id": response["request_id"],
                "expires_at": isoformat(min(expires_at, window_end)),
            },
        )

    @translate_errors
    def revoke(self, handle: str) -> None:
        """Revoke by accessor. An accessor Vault no longer knows is already gone: not an error."""
        try:
            self.client.auth.token.revoke_accessor(handle)
        except hvac.exceptions.InvalidRequest as exc:
            if not _is_unknown_accessor(exc):
                raise

    @translate_errors
    def is_gone(self, handle: str) -> bool:
        """True only when Vault itself says it no longer knows the token."""
        try:
            self.client.auth.token.lookup_accessor(handle)
        except hvac.exceptions.InvalidRequest as exc:
            if _is_unknown_accessor(exc):
                return True
            raise
        return False


def make_client(addr: str, token: str, timeout: int) -> hvac.Client:
    return hvac.Client(url=addr, token=token, timeout=timeout)


def make_backends(client: hvac.Client) -> dict[str, VaultTokenBackend]:
    """Backends by the name a policy uses for them; a new backend is one class added here."""
    return {backend.kind: backend for backend in (VaultTokenBackend(client),)}
