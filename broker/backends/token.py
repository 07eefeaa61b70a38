"""The Vault token kind: a token holding an entitlement's Vault policies for the window. It issues,
revokes, verifies and lists tokens only; what a grant may hold is the policy's to say."""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions

from ..errors import VaultUnavailable
from ..models import Holding, IssuedCredential, isoformat, parse_time, utcnow
from .base import Backend
from .vault import (
    TOKEN_ROLE,
    broker_tokens,
    holding_from,
    is_unknown_accessor,
    listed_accessors,
    revoke_accessor,
    seconds_until,
    tags,
    token_facts,
    translate_errors,
)

if TYPE_CHECKING:
    from ..policy import Entitlement, OptionsReader

# A lookup racing OpenBao's own removal of an expired token can be answered 403 for a moment.
LOOKUP_TRIES = 3
LOOKUP_PAUSE = 0.05  # seconds between them


def _expired(expire_time: object) -> bool:
    """Whether a token's `expire_time` (RFC 3339; None for a token that never expires) passed."""
    if not isinstance(expire_time, str) or not expire_time:
        return False
    try:
        return parse_time(expire_time) <= utcnow()
    except ValueError:
        return False


class VaultTokenKind:
    """The Vault token kind as the policy reads it: the entitlement's vault_policies are what the
    token holds, and it has no options table."""

    name = "vault_token"
    options_table = None
    grants_instead = None

    def read_options(self, reader: OptionsReader, name: str, spec: dict, backend: object) -> None:
        return None


class VaultTokenBackend(Backend):
    """A Vault token holding the entitlement's policies, made through the token role TOKEN_ROLE:
    orphaned (outlives nothing of the broker's), not renewable, and `explicit_max_ttl` ends it at
    the window end even if the broker dies. Tagged with the grant and the broker (`instance`), so
    the reconciler can find it."""

    kind = VaultTokenKind.name
    revocable = True
    verify_method = "Vault no longer knows the token's accessor"
    bulk_verify_method = "Vault no longer lists the token's accessor"

    def __init__(self, client: hvac.Client, instance: str = "") -> None:
        self.client = client
        self.instance = instance

    @translate_errors
    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: object = "",
    ) -> IssuedCredential:
        ttl = seconds_until(window_end)
        if ttl <= 0:
            raise VaultUnavailable("the window closed before Vault could issue the token")
        response = self.client.auth.token.create(
            role_name=TOKEN_ROLE,
            policies=list(entitlement.vault_policies),
            ttl=f"{ttl}s",
            explicit_max_ttl=f"{ttl}s",
            renewable=False,
            display_name=f"jit-{grant_id}",
            meta=tags(grant_id, requester, self.kind, self.instance),
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

    def identifiers(self, handle: str) -> dict[str, str]:
        """What names the credential, for the audit log's HMACs and `jit audit lookup`."""
        return {"accessor": handle}

    @translate_errors
    def revoke(self, handle: str) -> None:
        """Revoke by accessor. An accessor Vault no longer knows is already gone: not an error."""
        revoke_accessor(self.client, handle)

    @translate_errors
    def is_gone(self, handle: str) -> bool:
        """True when Vault itself says it no longer knows the token, or shows it past its own
        expiry: OpenBao refuses such a token on every use and deletes it a moment later, so a
        lookup racing that deletion proves it dead as surely (not a failed removal to alert on).
        A lookup in the middle of that deletion may be answered 403 for a moment: asked again,
        LOOKUP_TRIES times in all, before the refusal counts."""
        for _ in range(LOOKUP_TRIES - 1):
            try:
                return self._looked_up_gone(handle)
            except hvac.exceptions.Forbidden:
                time.sleep(LOOKUP_PAUSE)
        return self._looked_up_gone(handle)

    def _looked_up_gone(self, handle: str) -> bool:
        try:
            data = self.client.auth.token.lookup_accessor(handle)["data"]
        except hvac.exceptions.InvalidRequest as exc:
            if is_unknown_accessor(exc):
                return True
            raise
        return _expired(data.get("expire_time"))

    @translate_errors
    def gone_among(self, handles: Collection[str]) -> set[str]:
        """Of `handles` (accessors the broker recorded before this call), those Vault no longer
        lists: one LIST of every accessor instead of a lookup each. Accessors are never reused,
        so a token missing from a listing taken after it was made is gone for good."""
        listed = set(listed_accessors(self.client))
        return {handle for handle in handles if handle not in listed}

    @translate_errors
    def holdings(self) -> list[Holding]:
        """Every token this backend made for this broker that Vault still knows."""
        return [
            holding_from(data, accessor, f"Vault token: {token_facts(data)}")
            for accessor, data in broker_tokens(self.client, self.instance, self.kind)
        ]

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        """Whether `holding` is the credential a grant records by `recorded_handle`."""
        return bool(recorded_handle) and holding.handle == recorded_handle
