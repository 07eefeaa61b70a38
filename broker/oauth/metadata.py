"""The broker's RFC 8414 authorization server metadata, built and validated with authlib. It
advertises only the endpoints the broker serves: the caller says which exist, so a document never
points a tool at an endpoint that answers 404."""

from __future__ import annotations

from collections.abc import Collection

from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from ..config import CLIENT_ASSERTION_ALGORITHMS as ASSERTION_ALGORITHMS

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - RFC 8693 §2.1
JWKS_PATH = "/.well-known/jwks.json"
# Each OAuth endpoint: its path, and the members that describe it, present only with it.
ENDPOINTS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "token_endpoint": (
        "/oauth/token",
        {
            "grant_types_supported": [TOKEN_EXCHANGE],  # no refresh tokens, no other grant
            # The agent authenticates with its provider token as actor_token (RFC 8693 §2.1),
            # no client authentication of RFC 6749's ("none" is the honest registered value), or
            # with private_key_jwt (RFC 7523) when its keys are registered in [oauth.clients].
            "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        },
    ),
    "introspection_endpoint": (
        "/oauth/introspect",
        # A tool sends its own provider token as Authorization: Bearer (RFC 7662 §2.1 allows it).
        {"introspection_endpoint_auth_methods_supported": ["none"]},
    ),
    "revocation_endpoint": (
        "/oauth/revoke",
        {  # actor_token or private_key_jwt, as above
            "revocation_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
            "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        },
    ),
}


def server_metadata(issuer: str, served: Collection[str]) -> AuthorizationServerMetadata:
    """The metadata of the authorization server `issuer` (the broker's own URL, without a path),
    naming of `ENDPOINTS` only those whose path is in `served`. Raises ValueError when authlib
    finds it invalid, which it does without a token endpoint: no token endpoint, no authorization
    server."""
    base = issuer.rstrip("/")
    metadata: dict[str, object] = {
        "issuer": issuer,
        "jwks_uri": base + JWKS_PATH,
        # RFC 8414 requires this member; the broker has no authorization endpoint, so the only
        # honest value is "none" (OAuth 2.0 Multiple Response Types §4: no credentials from it).
        "response_types_supported": ["none"],
    }
    for member, (path, described) in ENDPOINTS.items():
        if path in served:
            metadata[member] = base + path
            metadata.update(described)
    document = AuthorizationServerMetadata(metadata)
    document.validate()
    return document
