"""The tool task kind: what a task grant for an agent holds is not a Vault credential but a
subject token, an opaque random handle the agent later presents at the token endpoint (RFC 8693
`subject_token`). Makes and names subject tokens; never stores, looks up or honours one (that is
broker/grants', through the store)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from ..errors import VaultUnavailable
from ..models import Holding, IssuedCredential, isoformat, utcnow
from .base import Backend

if TYPE_CHECKING:
    from ..policy import Entitlement, OptionsReader

# The token type the token endpoint names a task's subject token by (RFC 8693 3: a URI).
SUBJECT_TOKEN_TYPE = "urn:jit-broker:params:oauth:token-type:task"  # noqa: S105 (a name)
SUBJECT_TOKEN_BYTES = 32


def subject_token_handle(subject_token: str) -> str:
    """What the store keeps of a subject token: its SHA-256 (the token is 256 random bits, so a
    plain hash is enough, and the store alone never yields a usable token)."""
    return hashlib.sha256(subject_token.encode()).hexdigest()


class ToolTaskKind:
    """The tool task kind as the policy reads it: no Vault policies and no options table; the
    policy reads the entitlement's [task] table (agents, tools, scopes) itself, as a rule."""

    name = "tool_task"
    options_table = None
    grants_instead = "a task for an agent (its tools and scopes are in [entitlements.NAME.task])"

    def read_options(self, reader: OptionsReader, name: str, spec: dict, backend: object) -> None:
        return None


class ToolTaskBackend(Backend):
    """Issues a task's subject token. Nothing outside the broker holds it: it is honoured only by
    grants.task_for_subject_token, and only while its grant is `active`, holds this handle and its
    window is open. So revoking needs no call, and it is proven gone when the store says the broker
    would no longer honour it (`honoured`, given by whoever builds the backends: the backends never
    read the store themselves). Vault holds nothing of it, so the reconciler finds nothing."""

    kind = ToolTaskKind.name
    revocable = True
    verify_method = (
        "the broker honours a subject token only for its grant while that grant is active with it"
    )

    def __init__(self, honoured: Callable[[str], bool] | None = None):
        # Without a way to ask, nothing is ever proven gone: a task grant would stay revoke_failed
        # rather than claim a removal nobody checked.
        self.honoured = honoured or (lambda handle: True)

    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: object = "",
    ) -> IssuedCredential:
        if window_end <= utcnow():
            raise VaultUnavailable("the window closed before the task could start")
        token = secrets.token_urlsafe(SUBJECT_TOKEN_BYTES)
        return IssuedCredential(
            secret=token,
            handle=subject_token_handle(token),
            expires_at=window_end,
            kind=self.kind,
            details={"expires_at": isoformat(window_end), "token_type": SUBJECT_TOKEN_TYPE},
        )

    def identifiers(self, handle: str) -> dict[str, str]:
        """What names the credential, for the audit log's HMACs and `jit audit lookup`."""
        return {"subject_token_sha256": handle}

    def revoke(self, handle: str) -> None:
        """Nothing to call: the grant's state, already moved on, is what stops honouring it."""
        return None

    def is_gone(self, handle: str) -> bool:
        """Proven by the store: no grant is `active` with this handle any more (the reaper and an
        extension move it on in a committed transaction before they ask)."""
        return not self.honoured(handle)

    def holdings(self) -> list[Holding]:
        """Vault holds nothing of a task."""
        return []

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        return bool(recorded_handle) and holding.handle == recorded_handle
