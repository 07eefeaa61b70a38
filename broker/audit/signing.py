"""Signed checkpoints: the broker's Ed25519 key signs (size, head hash) of the log, so that a log
cut short, or rewritten with every hash recomputed, no longer matches what was signed. The key
lives in a file outside the database: whoever can edit the database cannot sign for it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .chain import canonical

STATEMENT = "jit-broker audit checkpoint v1"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """A PEM public key, which must be Ed25519; ValueError otherwise."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit public key must be an Ed25519 key")
    return key


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


def checkpoint_problem(public_key: Ed25519PublicKey, checkpoint: dict) -> str:
    """Why the checkpoint does not hold under this key ("" when it does)."""
    expected = key_id(public_key)
    if checkpoint.get("key_id") != expected:
        return (
            f"signed by key {checkpoint.get('key_id')}, not by {expected}: the signing key was "
            "replaced"
        )
    try:
        public_key.verify(base64.b64decode(checkpoint["signature"]), _statement(checkpoint))
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return "its signature does not verify: the checkpoint was forged or altered"
    return ""


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
