"""The credential backends, one module per kind behind the Backend protocol, over one shared Vault
client: the only package that talks to Vault for credentials (and, to verify that a database user
is gone, to PostgreSQL). Adding a kind is one module here, its name in `make_backends` and in the
policy's list of backends; nothing here decides what a grant may hold."""

from __future__ import annotations

import hvac

from .base import Backend
from .database import DatabaseBackend
from .ssh import SshCertificateBackend
from .token import VaultTokenBackend

__all__ = ["Backend", "make_backends"]


def make_backends(
    client: hvac.Client, postgres_dsn: str = "", timeout: int = 10, instance: str = ""
) -> dict[str, Backend]:
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
