"""Credential backends over one hvac client: each issues, revokes and verifies one kind of
credential. With own_token.py (the broker's own token), the only module that talks to Vault (and,
to verify that a database user is gone, to PostgreSQL); hvac, network and database errors become
broker errors here."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import wraps
from importlib import resources
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import psycopg
import requests
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .errors import (
    DatabaseUnavailable,
    InvalidDuration,
    InvalidRequest,
    VaultRejected,
    VaultUnavailable,
)
from .models import Holding, IssuedCredential, isoformat, utcnow

if TYPE_CHECKING:
    from .policy import Entitlement

CALL_LATENCY = timedelta(milliseconds=250)
# Every token the broker issues is made through this token role (auth/token/create/jit-broker):
# its allowed_policies, not the broker's own policies, bound what a token may hold, and it makes
# orphans. See broker/openbao/jit-broker.hcl.
TOKEN_ROLE = "jit-broker"  # noqa: S105 - a role name, not a secret
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


def _tags(grant_id: str, requester: str, kind: str, instance: str, **extra: str) -> dict:
    """Token metadata that lets the reconciler find what this broker made, and for which grant."""
    return {
        "jit_grant_id": grant_id,
        "jit_requester": requester,
        "jit_backend": kind,
        "jit_broker": instance,
        **extra,
    }


def _broker_tokens(client: hvac.Client, instance: str, kind: str) -> Iterator[tuple[str, dict]]:
    """(accessor, lookup data) of every token tagged with a grant of this broker and made by the
    backend `kind`. Listing accessors needs `sudo` on auth/token/accessors. A token made before the
    tags existed counts as the broker's (legacy), and as a database child token when its policy is
    one of the database backend's, as a plain token otherwise."""
    try:
        accessors = client.auth.token.list_accessors()["data"]["keys"]
    except hvac.exceptions.InvalidPath:  # Vault answers 404 to an empty listing
        return
    for accessor in accessors:
        try:
            data = client.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.InvalidRequest as exc:
            if _is_unknown_accessor(exc):
                continue  # expired between the listing and the lookup
            raise
        meta = data.get("meta") or {}
        if not meta.get("jit_grant_id"):
            continue
        if "jit_broker" in meta and meta["jit_broker"] != instance:
            continue  # another broker's, sharing this Vault
        made_by = meta.get("jit_backend") or (
            "database"
            if any(p.startswith("jit-db-") for p in data.get("policies") or [])
            else "vault_token"
        )
        if made_by == kind:
            yield accessor, data


def _holding(data: dict, handle: str, description: str) -> Holding:
    meta = data.get("meta") or {}
    created = data.get("creation_time")
    return Holding(
        grant_id=meta["jit_grant_id"],
        handle=handle,
        description=description,
        issued_at=datetime.fromtimestamp(created, UTC) if created else None,
        legacy="jit_broker" not in meta,
    )


def _token_facts(data: dict) -> str:
    created = data.get("creation_time")
    made = isoformat(datetime.fromtimestamp(created, UTC)) if created else "at an unknown time"
    policies = ", ".join(data.get("policies") or []) or "none"
    return f"policies {policies}; made {made}; {data.get('ttl', '?')}s left"


class VaultTokenBackend:
    """A Vault token holding the entitlement's policies, made through the token role TOKEN_ROLE:
    orphaned (outlives nothing of the broker's), not renewable, and `explicit_max_ttl` ends it at
    the window end even if the broker dies. Tagged with the grant and the broker (`instance`), so
    the reconciler can find it."""

    kind = "vault_token"
    revocable = True
    verify_method = "Vault no longer knows the token's accessor"

    def __init__(self, client: hvac.Client, instance: str = ""):
        self.client = client
        self.instance = instance

    @translate_errors
    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: str = "",
    ) -> IssuedCredential:
        ttl = _seconds_until(window_end)
        if ttl <= 0:
            raise VaultUnavailable("the window closed before Vault could issue the token")
        response = self.client.auth.token.create(
            role_name=TOKEN_ROLE,
            policies=list(entitlement.vault_policies),
            ttl=f"{ttl}s",
            explicit_max_ttl=f"{ttl}s",
            renewable=False,
            display_name=f"jit-{grant_id}",
            meta=_tags(grant_id, requester, self.kind, self.instance),
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

    def identifiers(self, handle: str) -> dict:
        """What names the credential, for the audit log's HMACs and `jit audit lookup`."""
        return {"accessor": handle}

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

    @translate_errors
    def holdings(self) -> list[Holding]:
        """Every token this backend made for this broker that Vault still knows."""
        return [
            _holding(data, accessor, f"Vault token: {_token_facts(data)}")
            for accessor, data in _broker_tokens(self.client, self.instance, self.kind)
        ]

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        """Whether `holding` is the credential a grant records by `recorded_handle`."""
        return bool(recorded_handle) and holding.handle == recorded_handle


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

    kind = "database"
    revocable = True
    verify_method = (
        "Vault no longer knows the lease, and the user no longer exists in PostgreSQL (pg_roles, "
        "checked with [postgres] dsn)"
    )

    def __init__(
        self, client: hvac.Client, verify_dsn: str = "", timeout: int = 10, instance: str = ""
    ):
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
        public_key: str = "",
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
                role_name=TOKEN_ROLE,
                policies=[policy],
                no_default_policy=True,
                ttl=f"{_seconds_until(window_end)}s",
                explicit_max_ttl=f"{_seconds_until(window_end)}s",
                renewable=False,
                display_name=f"jit-{grant_id}",
                meta=_tags(
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

    def identifiers(self, handle: str) -> dict:
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
        _revoke_accessor(self.client, found["accessor"])
        if found.get("role"):
            self.client.secrets.database.delete_role(found["role"], mount_point=found["mount"])

    def _leases(self, found: dict) -> list[str]:
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
                if _is_unknown_accessor(exc):
                    return True
                raise
            return False
        return not self._user_exists(found["username"])

    @translate_errors
    def holdings(self) -> list[Holding]:
        """Every database credential this backend made for this broker, by its child token."""
        found = []
        for accessor, data in _broker_tokens(self.client, self.instance, self.kind):
            meta = data.get("meta") or {}
            mount, role = meta.get("jit_mount", ""), meta.get("jit_role", "")
            handle = {"accessor": accessor, "lease_id": "", "mount": mount, "role": role}
            handle["username"] = ""
            where = f"role {role} at {mount}/" if role else "an unknown role"
            description = f"database user's child token for {where}: {_token_facts(data)}"
            found.append(_holding(data, json.dumps(handle, sort_keys=True), description))
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


MAX_PUBLIC_KEY = 16_384  # far beyond an RSA 8192 key in OpenSSH form


class SshCertificateBackend:
    """An OpenSSH user certificate for the requester's own public key, signed by the OpenBao SSH
    engine (a role with key_type "ca") for the entitlement's principals. Its `valid_before` is the
    window end at the latest, and that is the only way it ends: nothing can revoke a certificate
    (hosts check only its signature and validity), so `revocable` is False, `revoke` does nothing
    and it is gone once `valid_before` has passed. Vault keeps nothing of it, so there is nothing
    for the reconciler to find. The handle is JSON: serial and valid_before."""

    kind = "ssh"
    revocable = False
    verify_method = (
        "the certificate's validity ended (valid_before has passed); SSH certificates cannot be "
        "revoked, so they are capped to the window"
    )

    def __init__(
        self, client: hvac.Client, instance: str = "", clock: Callable[[], datetime] = utcnow
    ):
        self.client = client
        self.instance = instance
        self.clock = clock

    def check_request(self, public_key: str) -> None:
        """Refuse, before anything is recorded, a request without a usable OpenSSH public key."""
        _parsed_public_key(public_key)

    @translate_errors
    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: str = "",
    ) -> IssuedCredential:
        options = entitlement.ssh
        if options is None:
            raise VaultRejected(f"{entitlement.name} has no [ssh] table in the policy")
        key = _parsed_public_key(public_key)
        ttl = _seconds_until(window_end)
        if ttl <= 0:
            raise InvalidDuration("the window closed before Vault could sign the certificate")
        signed = self.client.secrets.ssh.sign_ssh_key(
            name=options.role,
            public_key=public_key.strip(),
            ttl=f"{ttl}s",
            valid_principals=",".join(options.principals),
            cert_type="user",
            key_id=f"jit-{grant_id} {requester}",
            mount_point=options.mount,
        )
        text = signed["data"]["signed_key"].strip()
        cert = serialization.load_ssh_public_identity(text.encode())
        valid_before = datetime.fromtimestamp(cert.valid_before, UTC)
        if valid_before > window_end or cert.public_key() != key:
            # Never hand out what outlives the window: it could not be taken back.
            raise VaultRejected(
                f"the signed certificate is valid until {isoformat(valid_before)}, after the "
                f"window end {isoformat(window_end)}, or is not for the key sent"
            )
        principals = [p.decode() for p in cert.valid_principals]
        return IssuedCredential(
            secret=text,
            handle=json.dumps(
                {"serial": cert.serial, "valid_before": cert.valid_before}, sort_keys=True
            ),
            expires_at=valid_before,
            kind=self.kind,
            details={
                "serial": str(cert.serial),
                "valid_principals": principals,
                "valid_before": isoformat(valid_before),
                "expires_at": isoformat(valid_before),
                "public_key_sha256": _ssh_fingerprint(public_key),
                "ssh_role": options.role,
                "mount": options.mount,
                "vault_request_id": signed["request_id"],
            },
        )

    def identifiers(self, handle: str) -> dict:
        return {"serial": str(json.loads(handle)["serial"])}

    def revoke(self, handle: str) -> None:
        """Nothing can revoke an SSH certificate; it ends at its valid_before."""

    def is_gone(self, handle: str) -> bool:
        return datetime.fromtimestamp(json.loads(handle)["valid_before"], UTC) <= self.clock()

    def holdings(self) -> list[Holding]:
        """Vault keeps nothing of a signed certificate."""
        return []

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        return bool(recorded_handle) and holding.handle == recorded_handle


def _parsed_public_key(public_key: object):
    if not isinstance(public_key, str) or not public_key.strip():
        raise InvalidRequest(
            "public_key is required for an SSH certificate: send your OpenSSH public key "
            "(the one line of ~/.ssh/id_ed25519.pub)"
        )
    if len(public_key) > MAX_PUBLIC_KEY or "cert-v01@openssh.com" in public_key.split()[0]:
        raise InvalidRequest("public_key must be an OpenSSH public key, not a certificate")
    try:
        return serialization.load_ssh_public_key(public_key.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidRequest(
            "public_key is not an OpenSSH public key: send one line like "
            "'ssh-ed25519 AAAA... you@host'"
        ) from None


def _ssh_fingerprint(public_key: str) -> str:
    """What `ssh-keygen -l` shows: SHA256 of the key's wire form, base64 without padding."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def openbao_policy() -> str:
    """The broker's own least-privilege OpenBao policy, shipped in the package so that an operator
    installs exactly what this version of the broker calls (`jit vault-policy` prints it)."""
    return resources.files(__package__).joinpath("openbao", "jit-broker.hcl").read_text()


def make_client(addr: str, token: str, timeout: int) -> hvac.Client:
    return hvac.Client(url=addr, token=token, timeout=timeout)


def make_backends(
    client: hvac.Client, postgres_dsn: str = "", timeout: int = 10, instance: str = ""
) -> dict:
    """Backends by the name a policy uses for them; a new backend is one class added here.
    `postgres_dsn` is only for verifying that database users are gone; `instance` tags what this
    broker issues, so its reconciler never touches another broker's credentials."""
    return {
        backend.kind: backend
        for backend in (
            VaultTokenBackend(client, instance),
            DatabaseBackend(client, postgres_dsn, timeout, instance),
            SshCertificateBackend(client, instance),
        )
    }


def vault_health(
    client: hvac.Client, timeout: float = 2, token: Callable[[], dict] | None = None
) -> dict:
    """Whether Vault answers sys/health, and how: for /healthz, never raises. `token` is the
    broker's own token's state (`OwnToken.health`): one about to lapse degrades the check too."""
    try:
        response = client.session.get(f"{client.url}/v1/sys/health", timeout=timeout)
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return {"ok": False, "error": f"Vault is unreachable: {type(exc).__name__}"}
    ok = response.status_code in (200, 429)  # 429: a standby, which forwards to the active node
    check = {"ok": ok, "status": response.status_code, "sealed": body.get("sealed")}
    if not ok:
        check["error"] = f"sys/health answered {response.status_code}"
    elif token is not None:
        check["token"] = own = token()
        if not own["ok"]:
            check.update(ok=False, error=own["error"])
    return check
