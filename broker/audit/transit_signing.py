"""Signs audit checkpoints with a key held in OpenBao's transit engine (Ed25519 or ECDSA P-256),
and reads that key's public versions into a `Keyring`. The private key never reaches the broker's
disk: the broker sends the checkpoint's statement and gets the signature back. Rotation is a
transit key rotation; each checkpoint names the version that signed it. Never decides when to
sign (the audit log does) and never raises anything but `CheckpointSigningFailed`."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable

import hvac
import hvac.exceptions
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .signing import TRANSIT_PREFIX, Keyring, PublicKey, load_any_public_key, statement_v2

KEY_TYPES = ("ed25519", "ecdsa-p256")


class CheckpointSigningFailed(Exception):
    """OpenBao did not sign (or its key cannot be read); the words say what to do. Never holds
    a token or a URL path beyond the key's own."""


class TransitCheckpointSigner:
    """Signs with `<mount>/sign/<key>` and reads `<mount>/keys/<key>`: the two paths the
    broker's OpenBao policy grants for it. The key's versions are read at most every `keys_ttl`
    seconds; a signature always names the newest version."""

    def __init__(
        self,
        client: hvac.Client,
        mount: str = "transit",
        key_name: str = "jit-broker-audit",
        keys_ttl: float = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.mount = mount
        self.key_name = key_name
        self.keys_ttl = keys_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._read: tuple[float, Keyring, int, str] | None = None  # at, keys, latest, type

    @property
    def path(self) -> str:
        return f"{self.mount}/keys/{self.key_name}"

    def kid(self, version: int) -> str:
        return f"{TRANSIT_PREFIX}{self.key_name}:v{version}"

    def keyring(self, fresh: bool = False) -> Keyring:
        """Every version transit still keeps (not older than its min_decryption_version)."""
        return self._versions(fresh)[0]

    def sign(self, fields: dict) -> dict:
        """A v2 checkpoint over `fields` (size, head, at, previous; legacy_key_id at the
        migration), naming the newest key version, which signs it."""
        _, latest, key_type = self._versions(fresh=False)
        checkpoint = {**fields, "key_id": self.kid(latest), "key_version": latest}
        message = base64.b64encode(statement_v2(checkpoint)).decode()
        options = {"hash_algorithm": "sha2-256"} if key_type == "ecdsa-p256" else {}
        answer = self._call(
            lambda: self.client.secrets.transit.sign_data(
                self.key_name,
                hash_input=message,
                key_version=latest,
                mount_point=self.mount,
                **options,
            ),
            f"{self.mount}/sign/{self.key_name}",
        )
        signature = (answer.get("data") or {}).get("signature", "")
        if not isinstance(signature, str) or not signature.startswith(f"vault:v{latest}:"):
            # Rotated since the versions were read: read them again, next time.
            self._read = None
            raise CheckpointSigningFailed(f"transit did not sign with version {latest}")
        return {**checkpoint, "signature": signature}

    def health(self) -> dict:
        """Whether the key can be read (for /readyz, beside whether signing works)."""
        try:
            keyring, latest, key_type = self._versions(fresh=True)
        except CheckpointSigningFailed as exc:
            return {"ok": False, "signer": "transit", "error": str(exc)}
        return {"ok": True, "signer": "transit", "key": self.kid(latest), "type": key_type,
                "versions": sorted(keyring.keys)}  # fmt: skip

    def _versions(self, fresh: bool) -> tuple[Keyring, int, str]:
        with self._lock:
            now = self.clock()
            if fresh or self._read is None or now - self._read[0] >= self.keys_ttl:
                try:
                    self._read = (now, *self._read_key())
                except CheckpointSigningFailed:
                    # The versions read before still check old checkpoints; only signing waits.
                    if fresh or self._read is None:
                        raise
            return self._read[1], self._read[2], self._read[3]

    def _read_key(self) -> tuple[Keyring, int, str]:
        answer = self._call(
            lambda: self.client.secrets.transit.read_key(self.key_name, mount_point=self.mount),
            self.path,
        )
        data = answer.get("data") or {}
        key_type = data.get("type")
        if key_type not in KEY_TYPES:
            raise CheckpointSigningFailed(
                f"the checkpoint key {self.path} is of type {key_type!r}, not one of "
                f"{', '.join(KEY_TYPES)}"
            )
        keys: dict[str, PublicKey] = {}
        for version, item in (data.get("keys") or {}).items():
            try:
                keys[self.kid(int(version))] = _public_key(key_type, item["public_key"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointSigningFailed(
                    f"version {version} of {self.path} has no readable public key"
                ) from None
        latest = int(data.get("latest_version") or 0)
        if self.kid(latest) not in keys:
            raise CheckpointSigningFailed(f"the latest version of {self.path} has no public key")
        return Keyring(keys), latest, key_type

    def _call(self, call: Callable[[], dict], path: str) -> dict:
        try:
            answer = call()
        except hvac.exceptions.Forbidden:
            raise CheckpointSigningFailed(
                f"the broker's OpenBao token may not use {path}: its policy (`jit vault-policy`) "
                "must name the [audit] transit_mount and transit_key"
            ) from None
        except hvac.exceptions.InvalidPath:
            raise CheckpointSigningFailed(
                f"the checkpoint key {self.path} does not exist in OpenBao: create it with "
                f"`bao write -f {self.path} type=ed25519`"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise CheckpointSigningFailed(f"OpenBao refused {path}: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise CheckpointSigningFailed(
                f"OpenBao cannot be reached to use {path}: {type(exc).__name__}"
            ) from None
        if not isinstance(answer, dict):
            raise CheckpointSigningFailed(f"OpenBao's answer for {path} is not JSON")
        return answer


def _public_key(key_type: str, text: object) -> PublicKey:
    """Transit gives an Ed25519 key as base64 of its 32 raw bytes, an ECDSA key as PEM."""
    if not isinstance(text, str):
        raise ValueError("no public key")
    if key_type == "ed25519":
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    return load_any_public_key(text)
