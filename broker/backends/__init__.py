"""The credential backends, one module per kind behind the Backend protocol, over one shared Vault
client: the only package that talks to Vault for credentials (and, to verify that a database user
is gone, to PostgreSQL). Each kind's module also says how a policy names it and reads its options
table (its KindReader). Adding a kind is one module here and its two entries below, in
`make_backends` and `POLICY_KINDS`; nothing here decides what a grant may hold."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import hvac

from .base import Backend
from .database import DatabaseBackend, DatabaseKind
from .ssh import SshCertificateBackend, SshKind
from .token import VaultTokenBackend, VaultTokenKind
from .tool_task import ToolTaskBackend, ToolTaskKind

if TYPE_CHECKING:
    from ..policy import KindReader

__all__ = ["POLICY_KINDS", "Backend", "make_backends"]

# What the policy loaders take (load_policy, check_policy_text, PolicyFile): every kind's name and
# options-table reader, in the order a policy's unknown-key hints list their tables.
POLICY_KINDS: tuple[KindReader, ...] = (
    VaultTokenKind(),
    DatabaseKind(),
    SshKind(),
    ToolTaskKind(),
)


def make_backends(
    client: hvac.Client,
    postgres_dsn: str = "",
    timeout: int = 10,
    instance: str = "",
    task_honoured: Callable[[str], bool] | None = None,
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
            ToolTaskBackend(task_honoured),
        )
    }
