"""What the broker publishes as the authorization server for tools: its JWK Set and its RFC 8414
metadata. No login: both are public by design, and hold no secret."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from werkzeug.exceptions import NotFound

from ..oauth.metadata import ENDPOINTS, JWKS_PATH, server_metadata
from . import services

bp = Blueprint("oauth_keys", __name__)

# A verifier that meets an unknown `kid` refetches the JWK Set: a short max-age keeps a shared
# cache from hiding a rotated key for long. The metadata changes only with a new broker version.
JWKS_MAX_AGE = 60
METADATA_MAX_AGE = 3600


@bp.get(JWKS_PATH)
def jwks() -> Response:
    response = jsonify(services().signer.jwks())
    response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE}"
    response.content_type = "application/jwk-set+json"
    return response


@bp.get("/.well-known/oauth-authorization-server")
def authorization_server() -> Response:
    served = {rule.rule for rule in current_app.url_map.iter_rules()}
    if ENDPOINTS["token_endpoint"][0] not in served:
        raise NotFound("this broker has no token endpoint yet, so it is no authorization server")
    response = jsonify(dict(server_metadata(services().signer.issuer, served)))
    response.headers["Cache-Control"] = f"public, max-age={METADATA_MAX_AGE}"
    return response
