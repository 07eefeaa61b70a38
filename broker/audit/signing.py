"""Signed checkpoints: a signature over (size, head hash) of the log, so that a log cut short, or
rewritten with every hash recomputed, no longer matches what was signed; and the `Keyring` of
public keys a checkpoint is checked against. Two formats: v2, signed through OpenBao's transit
engine (`transit_signing.py`; names its key version and the checkpoint before it), and v1, the
Ed25519 key file of older brokers (`FileKeySigner`), still verified for the logs it signed.
Pure: no network, no store."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ec import (
    ECDSA,
    SECP256R1,
    EllipticCurvePublicKey,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import canonical

STATEMENT = "jit-broker audit checkpoint v1"
STATEMENT_V2 = "jit-broker audit checkpoint v2"
LEGACY_PREFIX = "ed25519:"  # the key ids of v1 checkpoints (a key file's Ed25519 key)
TRANSIT_PREFIX = "transit:"  # the key ids of v2 checkpoints: transit:<key name>:v<version>

PublicKey = Ed25519PublicKey | EllipticCurvePublicKey


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """A PEM public key, which must be Ed25519; ValueError otherwise."""
    key = load_any_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit public key must be an Ed25519 key")
    return key


def load_any_public_key(pem: str | bytes) -> PublicKey:
    """A PEM public key that may sign checkpoints: Ed25519 or ECDSA P-256; ValueError otherwise."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1):
        return key
    raise ValueError("an audit public key must be Ed25519 or ECDSA P-256")


def any_public_pem(public_key: PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def algorithm_of(public_key: PublicKey) -> str:
    return "Ed25519" if isinstance(public_key, Ed25519PublicKey) else "ECDSA-P256-SHA256"


def spki_fingerprint(public_key: PublicKey) -> str:
    """What pins a key whatever it is called: the SHA-256 of its SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The signing key, made on first start (PKCS#8 PEM, readable by the owner only)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
    return load_private_key(path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def _statement(checkpoint: dict) -> bytes:
    fields = {name: checkpoint[name] for name in ("size", "head", "at", "key_id")}
    return canonical({"statement": STATEMENT, **fields})


def sign_checkpoint(key: Ed25519PrivateKey, size: int, head: str, at: str) -> dict:
    checkpoint = {"size": size, "head": head, "at": at, "key_id": key_id(key.public_key())}
    signature = key.sign(_statement(checkpoint))
    return dict(checkpoint, signature=base64.b64encode(signature).decode())


def statement_v2(checkpoint: dict) -> bytes:
    """What a v2 signature covers: every field of the checkpoint but the signature itself."""
    fields = {name: value for name, value in checkpoint.items() if name != "signature"}
    return canonical({"statement": STATEMENT_V2, **fields})


def is_legacy(checkpoint: dict) -> bool:
    return str(checkpoint.get("key_id", "")).startswith(LEGACY_PREFIX)


def _signature_holds(public_key: PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            public_key.verify(signature, message, ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _v2_signature(checkpoint: dict) -> bytes | None:
    """The signature bytes of `vault:v<version>:<base64>`, when the version is the one the
    checkpoint names; None for anything else."""
    text, version = checkpoint.get("signature"), checkpoint.get("key_version")
    prefix = f"vault:v{version}:"
    if not isinstance(text, str) or not isinstance(version, int) or not text.startswith(prefix):
        return None
    try:
        return base64.b64decode(text[len(prefix) :], validate=True)
    except ValueError:
        return None


@dataclass
class Keyring:
    """The public keys checkpoints are checked against, by key id. `file_keys` are the ids of a
    v1 key file's keys found beside the database: once the keyring holds transit keys, such a
    key is trusted only up to the size of a transit-signed checkpoint that names it
    (`legacy_key_id`, written once at the migration), since whoever holds the host can make a
    new key file and sign with it."""

    keys: dict[str, PublicKey] = field(default_factory=dict)
    file_keys: set[str] = field(default_factory=set)

    @classmethod
    def of_file_key(cls, public_key: PublicKey, pinned: bool = False) -> Keyring:
        """A v1 key (the key file's public half; `pinned`: the auditor's own copy)."""
        assert isinstance(public_key, Ed25519PublicKey)
        kid = key_id(public_key)
        return cls({kid: public_key}, set() if pinned else {kid})

    def merged(self, other: Keyring) -> Keyring:
        return Keyring({**self.keys, **other.keys}, self.file_keys | other.file_keys)

    @property
    def has_transit(self) -> bool:
        return any(kid.startswith(TRANSIT_PREFIX) for kid in self.keys)

    def pinned_to(self, pins: list[PublicKey]) -> Keyring:
        """Only the keys the auditor pinned (by their public key, whatever they are called):
        a bundle's or a host's own keys are what a forger would replace."""
        wanted = {spki_fingerprint(pin) for pin in pins}
        kept = {kid: k for kid, k in self.keys.items() if spki_fingerprint(k) in wanted}
        for pin in pins:
            if isinstance(pin, Ed25519PublicKey):
                kept.setdefault(key_id(pin), pin)
        return Keyring(kept, set())

    def problem(self, checkpoint: dict, vouched: dict[str, int] | None = None) -> str:
        """Why the checkpoint does not hold under this keyring ("" when it does). `vouched`:
        for each file key id, the largest size a verified transit checkpoint vouches for."""
        kid = checkpoint.get("key_id")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            trusted = ", ".join(sorted(self.keys)) or "no key at all"
            return f"signed by key {kid}, not by {trusted}: the signing key was replaced"
        if is_legacy(checkpoint):
            if kid in self.file_keys and self.has_transit:
                size = checkpoint.get("size")
                if not isinstance(size, int) or (vouched or {}).get(kid, -1) < size:
                    return (
                        f"signed by key {kid}, a key file that no checkpoint of the transit key "
                        "vouches for at this size: the signing key was replaced"
                    )
            try:
                signature = base64.b64decode(checkpoint["signature"])
                message = _statement(checkpoint)
            except (KeyError, TypeError, ValueError):
                signature, message = b"", b""
        else:
            signature, message = _v2_signature(checkpoint) or b"", statement_v2(checkpoint)
        if not signature or not _signature_holds(key, signature, message):
            return "its signature does not verify: the checkpoint was forged or altered"
        return ""

    def as_json(self) -> list[dict]:
        """For a bundle's keys.json: every key with its id, algorithm and PEM."""
        return [
            {"key_id": kid, "algorithm": algorithm_of(k), "public_key_pem": any_public_pem(k)}
            for kid, k in sorted(self.keys.items())
        ]

    @classmethod
    def from_json(cls, items: object) -> Keyring:
        """The inverse of as_json; ValueError naming what is wrong with outsider input."""
        if not isinstance(items, list):
            raise ValueError("keys.json must be a list of keys")
        keys: dict[str, PublicKey] = {}
        for number, item in enumerate(items, start=1):
            if not isinstance(item, dict) or not isinstance(item.get("key_id"), str):
                raise ValueError(f"key {number} of keys.json has no key_id")
            try:
                keys[item["key_id"]] = load_any_public_key(str(item.get("public_key_pem", "")))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"key {item['key_id']} of keys.json: {exc}") from None
        return cls(keys)


def checkpoint_problem(public_key: Ed25519PublicKey, checkpoint: dict) -> str:
    """Why a v1 checkpoint does not hold under this one key ("" when it does)."""
    return Keyring.of_file_key(public_key, pinned=True).problem(checkpoint)


def vouched_file_keys(keyring: Keyring, checkpoints: list[dict]) -> dict[str, int]:
    """For each v1 key a verified transit checkpoint names as the key it took over from, the
    largest size vouched for."""
    vouched: dict[str, int] = {}
    for checkpoint in checkpoints:
        legacy = checkpoint.get("legacy_key_id")
        if isinstance(legacy, str) and not is_legacy(checkpoint):
            if not keyring.problem(checkpoint):
                vouched[legacy] = max(vouched.get(legacy, -1), int(checkpoint["size"]))
    return vouched


def legacy_keyring(path: Path) -> Keyring:
    """The v1 key file's public half, when the file is there (a broker that signed with it
    before transit signing), trusted as far as a transit checkpoint vouches for it."""
    if not Path(path).exists():
        return Keyring()
    return Keyring.of_file_key(load_private_key(path).public_key())


class FileKeySigner:
    """The v1 signer: an Ed25519 key file. Brokers sign through transit now; this stays for the
    logs it signed (tests make such logs with it) and for `jit audit` to read them."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def sign(self, fields: dict) -> dict:
        return sign_checkpoint(self.key, fields["size"], fields["head"], fields["at"])

    def keyring(self) -> Keyring:
        return Keyring.of_file_key(self.key.public_key(), pinned=True)

    def health(self) -> dict:
        return {"ok": True, "key": key_id(self.key.public_key()), "signer": "file"}


def append_checkpoint(path: Path, checkpoint: dict) -> None:
    """Keep a copy of each checkpoint beside the key, outside the database: whoever cuts the log
    short and deletes the checkpoints from the database still leaves this copy behind."""
    line = canonical(checkpoint).decode() + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_checkpoints(path: Path) -> list[dict]:
    """The copies kept by append_checkpoint (none when there is no file); a torn last line, as a
    crash mid-write leaves, is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found
