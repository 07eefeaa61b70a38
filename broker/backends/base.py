"""What every credential kind provides to the grant use cases: the Backend protocol. It holds no
Vault call and no kind's knowledge; a kind that needs nothing of the requester inherits the no-op
`check_request`."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from ..models import Holding, IssuedCredential

if TYPE_CHECKING:
    from ..policy import Entitlement


class Backend(Protocol):
    """One kind of credential: issued for a grant's window, revoked, proven gone, and listed for
    the reconciler. `kind` is the name a policy's `backend` uses; `revocable` is False for a kind
    nothing can revoke (it ends only at its own expiry); `verify_method` says, for the audit log,
    how `is_gone` knows."""

    kind: str
    revocable: bool
    verify_method: str

    def check_request(self, public_key: object) -> None:
        """Refuse, before anything is recorded, a request this kind cannot serve. By default a
        kind needs nothing of the requester."""
        return None  # a body, so that this default is inherited rather than left abstract

    def issue(
        self,
        grant_id: str,
        entitlement: Entitlement,
        window_end: datetime,
        requester: str,
        public_key: object = "",
    ) -> IssuedCredential:
        """A credential for the grant that ends by `window_end` even if the broker dies."""
        ...

    def identifiers(self, handle: str) -> dict[str, str]:
        """What names the credential, for the audit log's HMACs and `jit audit lookup`."""
        ...

    def revoke(self, handle: str) -> None:
        """Revoke it; one already gone is not an error."""
        ...

    def is_gone(self, handle: str) -> bool:
        """True only when it is proven gone; an error when that cannot be known."""
        ...

    def gone_among(self, handles: Collection[str]) -> set[str] | None:
        """Of `handles`, those proven gone by one look at Vault for them all (the reaper's bulk
        check when windows close by the thousand); None when this kind cannot answer in bulk, so
        each is verified with `is_gone`. A handle missing from the answer is not proven gone."""
        return None

    # How `gone_among` knows, for the audit log (a kind that answers in bulk says it).
    bulk_verify_method: str = ""

    def holdings(self) -> list[Holding]:
        """Everything of this kind Vault holds for this broker, for the reconciler."""
        ...

    def is_recorded(self, holding: Holding, recorded_handle: str) -> bool:
        """Whether `holding` is the credential a grant records by `recorded_handle`."""
        ...
