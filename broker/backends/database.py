"""The database kind: a PostgreSQL user from OpenBao's database engine, ended by the window end in
layers, and verified gone in PostgreSQL itself. It never holds the user's password beyond handing
it out, and never decides what a grant may hold."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import psycopg

from ..errors import DatabaseUnavailable, InvalidDuration, VaultRejected
from ..models import Holding, IssuedCredential, isoformat, utcnow
from .base import Backend
from .options import RoleTableText, role_table
from .vault import (
    CALL_LATENCY,
    TOKEN_ROLE,
    broker_tokens,
    holding_from,
    is_unknown_accessor,
    revoke_accessor,
    seconds_until,
    tags,
    token_facts,
    translate_errors,
)

if TYPE_CHECKING:
    from ..policy import Entitlement, OptionsReader

# The database engine renders {{expiration}} (PostgreSQL's VALID UNTIL) as the lease end plus
# five seconds, so the lease is made this much shorter than the window.
VALID_UNTIL_MARGIN = timedelta(seconds=5)
ROLE_STATEMENTS = (
    "creation_statements",
    "revocation_statements",
    "rollback_statements",
    "renew_statements",
)


@dataclass(frozen=True)
class DatabaseOptions:
    """Where a database entitlement's users come from: the OpenBao database role (under the
    database secrets engine mounted at `mount`) whose creation and revocation statements the
    broker's per-grant role copies."""

    role: str
    mount: str = "database"
    # Where people connect to the database (postgresql://host:port/dbname), handed out with the
    # credential so `jit exec` can set PGHOST, PGPORT and PGDATABASE; "" when not said.
    connect: str = ""

    def connection(self) -> dict[str, object]:
        """host, port and dbname from `connect` (empty when it is not set)."""
        if not self.connect:
            return {}
        parts = urlsplit(self.connect)
        return {
            "host": parts.hostname,
            "port": parts.port or 5432,
            "dbname": parts.path.lstrip("/") or None,
        }


def database_options(entitlement: Entitlement) -> DatabaseOptions | None:
    """The entitlement's database options; None when it is not a database entitlement."""
    options = entitlement.options
    return options if isinstance(options, DatabaseOptions) else None


class DatabaseKind:
    """The database kind as the policy reads it: `[entitlements.NAME.database]` with role and
    mount, and no vault_policies."""

    name = "database"
    options_table = "database"
    grants_instead = (
        "a database entitlement: what the user may do is the database role's creation statements"
    )
    text = RoleTableText(
        "a",
        "with role, the OpenBao database role to issue users from",
        "the OpenBao role",
        "database or db/prod",
    )

    def read_options(
        self, reader: OptionsReader, name: str, spec: dict, backend: object
    ) -> DatabaseOptions | None:
        found_before = reader.problem_count
        keys = ("role", "mount", "connect")
        found = role_table(reader, name, spec, backend, self.name, keys, self.text)
        if found is None or found.role is None or found.mount is None:
            return None
        connect = found.table.get("connect", "")
        if not _connect_url(connect):
            reader.problem(
                (*found.at, "connect"),
                f"{name}: database.connect {connect!r} must be a URL like "
                "postgresql://db.internal:5432/app (no user or password)",
            )
        if reader.problem_count > found_before:
            return None
        return DatabaseOptions(found.role, found.mount, connect)


def _connect_url(value: object) -> bool:
    """ "" or postgresql://host[:port][/dbname] without credentials, query or fragment."""
    if value == "":
        return True
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return False
    return (
        parts.scheme in ("postgresql", "postgres")
        and bool(parts.hostname)
        and parts.username is None
        and not parts.query
        and not parts.fragment
        and "/" not in parts.path.lstrip("/")
    )


class DatabaseBackend(Backend):
    """A PostgreSQL user from OpenBao's database engine, in layers that each end it by the window
    end even if the broker dies: a per-grant copy of the entitlement's role whose lease TTL (and
    so the user's VALID UNTIL) ends at the window; read through a per-grant child token whose
    explicit_max_ttl is the window end (Vault revokes a token's leases with it; made through
    TOKEN_ROLE, it is an orphan, so the broker's own token's TTL neither shortens nor ends it);
    and the reaper's revocation, whose role statements should end the user's sessions before
    dropping it.

    The handle is JSON: lease id, the child token's accessor, the username, the mount and the
    per-credential role. Never the password. The reconciler finds these credentials by their child
    tokens (tagged with the grant, the broker, the mount and the role): a user needs a lease, and a
    lease is only ever read through a child token, so a crash at any step leaves one to find. A
    handle built from a child token alone has no lease id or username (Vault's token lookup knows
    neither): its leases are found by listing the per-credential role's prefix."""

    kind = DatabaseKind.name
    revocable = True
    verify_method = (
        "Vault no longer knows the lease, and the user no longer exists in PostgreSQL (pg_roles, "
        "checked with [postgres] dsn)"
    )

    def __init__(
        self, client: hvac.Client, verify_dsn: str = "", timeout: int = 10, instance: str = ""
    ) -> None:
        self.client = client
        self.verify_dsn = verify_dsn
        self.timeout = timeout
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
        options = database_options(entitlement)
        if options is None:
            raise VaultRejected(f"{entitlement.name} has no [database] table in the policy")
        ttl = seconds_until(window_end - VALID_UNTIL_MARGIN)
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
                role_name=TOKEN_ROLE,
                policies=[policy],
                no_default_policy=True,
                ttl=f"{seconds_until(window_end)}s",
                explicit_max_ttl=f"{seconds_until(window_end)}s",
                renewable=False,
                display_name=f"jit-{grant_id}",
                meta=tags(
                    grant_id, requester, self.kind, self.instance, jit_mount=mount, jit_role=role
                ),
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
                revoke_accessor(self.client, accessor)
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
            private={"username": username},
            details={
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

    def identifiers(self, handle: str) -> dict[str, str]:
        found = json.loads(handle)
        names = ("lease_id", "accessor", "username")
        return {name: found[name] for name in names if found.get(name)}

    @translate_errors
    def revoke(self, handle: str) -> None:
        """Revoke the lease (its revocation statements drop the user); then the child token and
        the per-grant role. A lease or accessor Vault no longer knows is already gone. The role
        goes only once the lease is revoked: Vault revokes with the role's statements."""
        found = json.loads(handle)
        for lease_id in self._leases(found):
            self.client.sys.revoke_lease(lease_id)
        revoke_accessor(self.client, found["accessor"])
        if found.get("role"):
            self.client.secrets.database.delete_role(found["role"], mount_point=found["mount"])

    def _leases(self, found: dict[str, str]) -> list[str]:
        """The lease the handle names; or, for a handle the reconciler built from a child token,
        every lease still under the per-credential role (a LIST that needs `sudo`)."""
        if found.get("lease_id"):
            return [found["lease_id"]]
        if not found.get("role"):
            return []
        prefix = f"{found['mount']}/creds/{found['role']}/"
        try:
            keys = self.client.sys.list_leases(prefix)["data"]["keys"]
        except hvac.exceptions.InvalidPath:  # nothing left under the prefix
            return []
        return [prefix + key for key in keys]

    @translate_errors
    def is_gone(self, handle: str) -> bool:
        """True only when Vault says it no longer knows the lease AND PostgreSQL has no such
        role. The broker never holds the password, so it cannot try a login; the role's absence
        is the check. PostgreSQL out of reach is an error (not verified), never "gone"."""
        found = json.loads(handle)
        for lease_id in self._leases(found):
            try:
                self.client.sys.read_lease(lease_id)
            except hvac.exceptions.InvalidRequest as exc:
                if "invalid lease" not in str(exc):
                    raise
            else:
                return False
        if not found.get("username"):
            # Found by the reconciler: no username to look up, so the token must be gone too;
            # Vault drops a lease only once the role's revocation statements have run.
            try:
                self.client.auth.token.lookup_accessor(found["accessor"])
            except hvac.exceptions.InvalidRequest as exc:
                if is_unknown_accessor(exc):
                    return True
                raise
            return False
        return not self._user_exists(found["username"])

    @translate_errors
    def holdings(self) -> list[Holding]:
        """Every database credential this backend made for this broker, by its child token."""
        found = []
        for accessor, data in broker_tokens(self.client, self.instance, self.kind):
            meta = data.get("meta") or {}
            mount, role = meta.get("jit_mount", ""), meta.get("jit_role", "")
            handle = {"accessor": accessor, "lease_id": "", "mount": mount, "role": role}
            handle["username"] = ""
            where = f"role {role} at {mount}/" if role else "an unknown role"
            description = f"database user's child token for {where}: {token_facts(data)}"
            found.append(holding_from(data, json.dumps(handle, sort_keys=True), description))
        return found

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        """Whether `holding` (a child token) belongs to the credential a grant records."""
        if not recorded_handle:
            return False
        recorded = json.loads(recorded_handle).get("accessor")
        return recorded == json.loads(holding.handle)["accessor"]

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
