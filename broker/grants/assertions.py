"""Single use of the client assertions agents authenticate with (private_key_jwt, RFC 7523 §3
item 7): each (client id, jti) is recorded once, until its assertion has expired, so a replay is
refused whichever broker process sharing the store it reaches. Records no audit entry: an
assertion is a way to authenticate, not a change to any grant."""

from __future__ import annotations

import hashlib

from .base import GrantsBase


class Assertions(GrantsBase):
    def first_use(self, client_id: str, jti: str, until: int) -> bool:
        """True the first time this client's `jti` is seen (it is recorded until `until`, epoch
        seconds), False ever after; racing requests with the same one get one True between them."""
        key = hashlib.sha256(f"{client_id}\n{jti}".encode()).hexdigest()
        with self.store.transaction() as tx:
            return tx.use_assertion_jti(key, until, self.clock().timestamp())
