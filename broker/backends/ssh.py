"""The SSH kind: an OpenSSH user certificate for the requester's own public key, signed by OpenBao's
SSH engine and capped to the window. Nothing can revoke a certificate, so it never claims to; it
checks the key before anything is recorded."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import hvac
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization.ssh import SSHCertificate, SSHPublicKeyTypes

from ..errors import InvalidDuration, InvalidRequest, VaultRejected
from ..models import Holding, IssuedCredential, isoformat, utcnow
from .base import Backend
from .options import RoleTableText, role_table
from .vault import seconds_until, translate_errors

if TYPE_CHECKING:
    from ..policy import Entitlement, OptionsReader

MAX_PUBLIC_KEY = 16_384  # far beyond an RSA 8192 key in OpenSSH form
PRINCIPAL = re.compile(r"[^\s,]+")  # Vault takes valid_principals comma-separated


@dataclass(frozen=True)
class SshOptions:
    """Who signs an ssh entitlement's certificates: the OpenBao SSH role (key_type "ca", under the
    SSH secrets engine mounted at `mount`), and the principals every certificate is valid for."""

    role: str
    principals: tuple[str, ...]
    mount: str = "ssh"


def ssh_options(entitlement: Entitlement) -> SshOptions | None:
    """The entitlement's ssh options; None when it is not an ssh entitlement."""
    options = entitlement.options
    return options if isinstance(options, SshOptions) else None


class SshKind:
    """The ssh kind as the policy reads it: `[entitlements.NAME.ssh]` with role, mount and
    principals, and no vault_policies."""

    name = "ssh"
    options_table = "ssh"
    grants_instead = (
        "an ssh entitlement: what the certificate allows is its principals on the hosts that "
        "trust the CA"
    )
    text = RoleTableText(
        "an",
        "with role, the OpenBao SSH role that signs, and principals, the users the certificate "
        "is for",
        "the OpenBao SSH role",
        "ssh or ssh/prod",
    )

    def read_options(
        self, reader: OptionsReader, name: str, spec: dict, backend: object
    ) -> SshOptions | None:
        found_before = reader.problem_count
        keys = ("role", "mount", "principals")
        found = role_table(reader, name, spec, backend, self.name, keys, self.text)
        if found is None:
            return None
        table, at, role, mount = found
        principals = reader.names(
            table.get("principals"), (*at, "principals"), f"{name}: ssh.principals"
        )
        if "principals" not in table:
            reader.problem(
                at, f'{name}: ssh.principals is missing: the users to sign for, like ["deploy"]'
            )
        elif table["principals"] == []:
            reader.problem((*at, "principals"), f"{name}: ssh.principals must name at least one")
        for principal in principals:
            if not PRINCIPAL.fullmatch(principal):
                reader.problem(
                    (*at, "principals"),
                    f"{name}: ssh principal {principal!r} may hold no spaces or commas",
                )
        if role is None or mount is None or reader.problem_count > found_before:
            return None
        return SshOptions(role, principals, mount)


class SshCertificateBackend(Backend):
    """An OpenSSH user certificate for the requester's own public key, signed by the OpenBao SSH
    engine (a role with key_type "ca") for the entitlement's principals. Its `valid_before` is the
    window end at the latest, and that is the only way it ends: nothing can revoke a certificate
    (hosts check only its signature and validity), so `revocable` is False, `revoke` does nothing
    and it is gone once `valid_before` has passed. Vault keeps nothing of it, so there is nothing
    for the reconciler to find. The handle is JSON: serial and valid_before."""

    kind = SshKind.name
    revocable = False
    verify_method = (
        "the certificate's validity ended (valid_before has passed); SSH certificates cannot be "
        "revoked, so they are capped to the window"
    )

    def __init__(
        self, client: hvac.Client, instance: str = "", clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.client = client
        self.instance = instance
        self.clock = clock

    def check_request(self, public_key: object) -> None:
        """Refuse, before anything is recorded, a request without a usable OpenSSH public key."""
        _parsed_public_key(public_key)

    @translate_errors
    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: object = "",
    ) -> IssuedCredential:
        options = ssh_options(entitlement)
        if options is None:
            raise VaultRejected(f"{entitlement.name} has no [ssh] table in the policy")
        key = _parsed_public_key(public_key)
        assert isinstance(public_key, str)  # _parsed_public_key refuses anything else
        ttl = seconds_until(window_end)
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
        if not isinstance(cert, SSHCertificate):
            # Not what sign_ssh_key answers, and without valid_before nothing bounds it.
            raise VaultRejected("Vault's SSH engine answered a public key, not a certificate")
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

    def identifiers(self, handle: str) -> dict[str, str]:
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


def _parsed_public_key(public_key: object) -> SSHPublicKeyTypes:
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
