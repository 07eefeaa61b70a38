"""The audit log: entry types, the hash chain, signed checkpoints, verification, export, the
auditors' search and forwarding. Imports nothing of the broker but models, errors and urls (the
store through a Protocol); storing entries is the store's job, deciding what to log the use
cases' job."""

from .chain import GENESIS, canonical, entry_hash, fingerprint, seal
from .signing import (
    Keyring,
    append_checkpoint,
    checkpoint_problem,
    key_id,
    load_any_public_key,
    load_or_create_key,
    load_private_key,
    load_public_key,
    public_pem,
    read_checkpoints,
    sign_checkpoint,
)
from .verify import Verification, verify

__all__ = [
    "GENESIS",
    "Keyring",
    "Verification",
    "append_checkpoint",
    "canonical",
    "checkpoint_problem",
    "entry_hash",
    "fingerprint",
    "key_id",
    "load_any_public_key",
    "load_or_create_key",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "read_checkpoints",
    "seal",
    "sign_checkpoint",
    "verify",
]
