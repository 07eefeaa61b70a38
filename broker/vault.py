"""Credential backends over one hvac client: each issues, revokes and verifies one kind of
credential. The only module that talks to Vault (and, to verify that a database user is gone, to
PostgreSQL); hvac, network and database errors become broker errors here."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import psycopg
import requests

from .errors import DatabaseUnavailable, InvalidDuration, VaultRejected, VaultUnavailable
from .models import IssuedCredential, isoformat, utcnow

if TYPE_CHECKING:
    from .policy import Entitlement

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
        self, grant_id: str, entitlement: Entitlement, window_end: datetime, requester: str
    ) -> IssuedCredential:
        ttl = _seconds_until(window_end)
        if ttl <= 0:
            raise VaultUnavailable("the window closed before Vault could issue the token")
        response = self.client.auth.token.create_orphan(
            policies=list(entitlement.vault_policies),
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
        _revoke_accessor(self.client, handle)

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


def _seconds_until(window_end: datetime) -> int:
    """Vault counts a credential's life in whole seconds from its creation second. Measuring
    from the second Vault will see (allowing for the call's latency) makes it end on the window's
    last second or just before it, never after it."""
    return int((window_end - (utcnow() + CALL_LATENCY).replace(microsecond=0)).total_seconds())


def _revoke_accessor(client: hvac.Client, accessor: str) -> None:
    try:
        client.auth.token.revoke_accessor(accessor)
    except hvac.exceptions.InvalidRequest as exc:
        if not _is_unknown_accessor(exc):
            raise


# The database engine renders {{expiration}} (PostgreSQL's VALID UNTIL) as the lease end plus
# five seconds, so the lease is made this much shorter than the window.
VALID_UNTIL_MARGIN = timedelta(seconds=5)
ROLE_STATEMENTS = (
    "creation_statements",
    "revocation_statements",
    "rollback_statements",
    "renew_statements",
)


class DatabaseBackend:
    """A PostgreSQL user from OpenBao's database engine, in layers that each end it by the window
    end even if the broker dies: a per-grant copy of the entitlement's role whose lease TTL (and
    so the user's VALID UNTIL) ends at the window; read through a per-grant child token whose
    explicit_max_ttl is the window end (Vault revokes a token's leases with it); and the reaper's
    revocation, whose role statements should end the user's sessions before dropping it.

    The handle is JSON: lease id, the child token's accessor, the username, the mount and the
    per-credential role. Never the password."""

    kind = "database"
    verify_method = (
        "Vault no longer knows the lease, and the user no longer exists in PostgreSQL (pg_roles, "
        "checked with [postgres] dsn)"
    )

    def __init__(self, client: hvac.Client, verify_dsn: str = "", timeout: int = 10):
        self.client = client
        self.verify_dsn = verify_dsn
        self.timeout = timeout

    @translate_errors
    def issue(
        self, grant_id: str, entitlement: Entitlement, window_end: datetime, requester: str
    ) -> IssuedCredential:
        options = entitlement.database
        if options is None:
            raise VaultRejected(f"{entitlement.name} has no [database] table in the policy")
        ttl = _seconds_until(window_end - VALID_UNTIL_MARGIN)
        if ttl <= 0:
            shortest = int((VALID_UNTIL_MARGIN + 2 * CALL_LATENCY).total_seconds()) + 1
            raise InvalidDuration(f"a database user needs a window of at least {shortest}s")
        # Unique per credential: an extension issues a second one for the same grant, and
        # removing the first must not take the second's role with it.
        mount, role = options.mount, f"jit-{options.role}-{grant_id}-{secrets.token_hex(3)}"
        engine = self.client.secrets.database
        base = engine.read_role(options.role, mount_point=mount)["data"]
        engine.create_role(
            role,
            base["db_name"],
            default_ttl=f"{ttl}s",
            max_ttl=f"{ttl}s",
            mount_point=mount,
            **{name: base.get(name) or [] for name in ROLE_STATEMENTS},
        )
        accessor = ""
        try:
            policy = self._creds_policy(mount, options.role)
            child = self.client.auth.token.create(
                policies=[policy],
                no_default_policy=True,
                ttl=f"{_seconds_until(window_end)}s",
                explicit_max_ttl=f"{_seconds_until(window_end)}s",
                renewable=False,
                display_name=f"jit-{grant_id}",
                meta={"jit_grant_id": grant_id, "jit_requester": requester},
            )["auth"]
            accessor = child["accessor"]
            reader = hvac.Client(
                url=self.client.url,
                token=child["client_token"],
                session=self.client.session,
                timeout=self.timeout,
            )
            creds = reader.secrets.database.generate_credentials(role, mount_point=mount)
        except Exception:
            # Nothing is recorded of this credential yet, so nothing of it may be left behind.
            if accessor:
                _revoke_accessor(self.client, accessor)
            engine.delete_role(role, mount_point=mount)
            raise
        username = creds["data"]["username"]
        expires_at = min(
            utcnow().replace(microsecond=0) + timedelta(seconds=creds["lease_duration"]),
            window_end,
        )
        handle = {
            "lease_id": creds["lease_id"],
            "accessor": accessor,
            "username": username,
            "mount": mount,
            "role": role,
        }
        return IssuedCredential(
            secret=creds["data"]["password"],
            handle=json.dumps(handle, sort_keys=True),
            expires_at=expires_at,
            kind=self.kind,
            details={
                "username": username,
                "database_role": options.role,
                "mount": mount,
                "ttl": creds["lease_duration"],
                "vault_request_id": creds["request_id"],
                "expires_at": isoformat(expires_at),
            },
        )

    def _creds_policy(self, mount: str, role: str) -> str:
        """The child tokens' one permission: reading users from this role's per-grant copies.
        Written on every issue, so a deleted or edited policy mends itself."""
        name = f"jit-db-{mount.replace('/', '-')}-{role}"
        rules = f'path "{mount}/creds/jit-{role}-*" {{ capabilities = ["read"] }}'
        self.client.sys.create_or_update_policy(name, rules)
        return name

    @translate_errors
    def revoke(self, handle: str) -> None:
        """Revoke the lease (its revocation statements drop the user); then the child token and
        the per-grant role. A lease or accessor Vault no longer knows is already gone. The role
        goes only once the lease is revoked: Vault revokes with the role's statements."""
        found = json.loads(handle)
        self.client.sys.revoke_lease(found["lease_id"])
        _revoke_accessor(self.client, found["accessor"])
        self.client.secrets.database.delete_role(found["role"], mount_point=found["mount"])

    @translate_errors
    def is_gone(self, handle: str) -> bool:
        """True only when Vault says it no longer knows the lease AND PostgreSQL has no such
        role. The broker never holds the password, so it cannot try a login; the role's absence
        is the check. PostgreSQL out of reach is an error (not verified), never "gone"."""
        found = json.loads(handle)
        try:
            self.client.sys.read_lease(found["lease_id"])
        except hvac.exceptions.InvalidRequest as exc:
            if "invalid lease" not in str(exc):
                raise
        else:
            return False
        return not self._user_exists(found["username"])

    def _user_exists(self, username: str) -> bool:
        if not self.verify_dsn:
            raise DatabaseUnavailable(
                "no [postgres] dsn is configured, so the database user's removal cannot be verified"
            )
        try:
            with psycopg.connect(self.verify_dsn, connect_timeout=self.timeout) as connection:
                row = connection.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)
                ).fetchone()
        except psycopg.Error as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise DatabaseUnavailable(
                f"PostgreSQL could not be asked whether the user is gone: "
                f"{type(exc).__name__}: {first_line}"
            ) from exc
        return row is not None


def make_client(addr: str, token: str, timeout: int) -> hvac.Client:
    return hvac.Client(url=addr, token=token, timeout=timeout)


def make_backends(client: hvac.Client, postgres_dsn: str = "", timeout: int = 10) -> dict:
    """Backends by the name a policy uses for them; a new backend is one class added here.
    `postgres_dsn` is only for verifying that database users are gone."""
    return {
        backend.kind: backend
        for backend in (
            VaultTokenBackend(client),
            DatabaseBackend(client, postgres_dsn, timeout),
        )
    }
