"""The agents that may authenticate at the token endpoint with private_key_jwt (RFC 7523 §2.2), as
`[oauth.clients."<client id>"]` registers them, and their public keys: inline (`jwks`) or from
their `jwks_uri` through identity's JWKS cache (its lifetime and refetch cooldown). Finds keys;
never holds a private key and never checks an assertion (that is `client_assertion`'s)."""

from __future__ import annotations

import jwt

from ..identity import ProviderKeys
from ..models import Principal

PRIVATE_KEY_JWT = "private_key_jwt"
# The issuer the audit chain records for an agent that authenticated with private_key_jwt: the
# broker vouched for it, by a key its own configuration names, not the OIDC provider.
PRIVATE_KEY_JWT_ISSUER = "urn:jit-broker:client-auth:private_key_jwt"


class AgentClient:
    """One registered agent, as authlib's client: its id and where its public keys are."""

    def __init__(self, client_id: str, inline: dict[str, jwt.PyJWK], remote: ProviderKeys | None):
        self.client_id = client_id
        self.inline = inline
        self.remote = remote

    def key(self, kid: str) -> jwt.PyJWK | None:
        """The agent's public key named `kid`, or None. Raises ProviderUnavailable when the key
        is neither inline nor cached and its jwks_uri cannot be read."""
        found = self.inline.get(kid)
        if found is None and self.remote is not None:
            found = self.remote.get(kid)
        return found

    def principal(self) -> Principal:
        """The agent as the rest of the token endpoint knows it: the same kind of Principal as an
        agent's client-credentials token gives, with the issuer saying how it authenticated."""
        return Principal(
            issuer=PRIVATE_KEY_JWT_ISSUER,
            subject=self.client_id,
            kind="agent",
            client_id=self.client_id,
        )

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == PRIVATE_KEY_JWT


class AgentClients:
    """Every registered agent, built once from the checked settings (broker/config.py): the JWKS
    cache of each jwks_uri lives as long as the broker."""

    def __init__(self, clients: dict[str, dict], timeout: float = 5):
        self._clients: dict[str, AgentClient] = {}
        for client_id, client in clients.items():
            keys = client.get("jwks") or {"keys": []}
            inline = {key["kid"]: jwt.PyJWK(key) for key in keys["keys"]}
            uri = client.get("jwks_uri")
            remote = ProviderKeys(uri, timeout=timeout) if uri else None
            self._clients[client_id] = AgentClient(client_id, inline, remote)

    def get(self, client_id: str) -> AgentClient | None:
        return self._clients.get(client_id)
