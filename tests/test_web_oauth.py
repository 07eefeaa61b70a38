"""broker/web/oauth.py: the JWK Set and the RFC 8414 metadata, public, cacheable, validated with
authlib, pointing at the broker's own URLs; a broker without its signing key still starts and
says so on /readyz."""

import jwt
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

from tests.helpers import health


def test_the_jwks_publishes_es256_signing_keys_with_their_kids(make_app):
    app = make_app()
    signer = app.extensions["jit"].signer

    response = app.test_client().get("/.well-known/jwks.json")  # no login

    assert response.status_code == 200
    assert response.content_type == "application/jwk-set+json"
    assert response.headers["Cache-Control"] == "public, max-age=60"
    keys = response.get_json()["keys"]
    assert keys and all(
        (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
        for key in keys
    )
    assert keys[0]["kid"] == signer.kid(signer.versions().latest)
    assert not any("d" in key for key in keys)  # public keys only
    assert jwt.PyJWKSet.from_dict({"keys": keys})[keys[0]["kid"]].algorithm_name == "ES256"


def test_the_metadata_names_the_auth_methods_the_endpoints_accept(make_app):
    metadata = make_app().test_client().get("/.well-known/oauth-authorization-server").get_json()

    # actor_token (token, revocation) and a tool's bearer (introspection): no RFC 6749 method;
    # private_key_jwt (RFC 7523) at the token and revocation endpoints, with pinned algorithms.
    assert metadata["token_endpoint_auth_methods_supported"] == ["none", "private_key_jwt"]
    assert metadata["introspection_endpoint_auth_methods_supported"] == ["none"]
    assert metadata["revocation_endpoint_auth_methods_supported"] == ["none", "private_key_jwt"]
    for endpoint in ("token_endpoint", "revocation_endpoint"):
        algorithms = metadata[f"{endpoint}_auth_signing_alg_values_supported"]
        assert algorithms == ["ES256", "RS256"]


def test_the_metadata_validates_and_names_only_the_endpoints_the_broker_serves(make_app):
    app = make_app()
    base = app.extensions["jit"].settings.server["base_url"]

    response = app.test_client().get("/.well-known/oauth-authorization-server")

    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    metadata = response.get_json()
    AuthorizationServerMetadata(metadata).validate()
    assert metadata["issuer"] == base
    assert metadata["token_endpoint"] == f"{base}/oauth/token"
    assert metadata["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert metadata["grant_types_supported"] == ["urn:ietf:params:oauth:grant-type:token-exchange"]
    assert metadata["introspection_endpoint"] == f"{base}/oauth/introspect"
    assert metadata["revocation_endpoint"] == f"{base}/oauth/revoke"


def test_the_issuer_may_be_set_apart_from_the_base_url(make_app):
    app = make_app(oauth={"issuer": "https://jit.example.com"})

    metadata = app.test_client().get("/.well-known/oauth-authorization-server").get_json()

    assert metadata["issuer"] == "https://jit.example.com"
    assert metadata["token_endpoint"] == "https://jit.example.com/oauth/token"


def test_a_broker_without_its_signing_key_starts_and_says_so(make_app):
    app = make_app(oauth={"signing_key": "not-made-yet"})

    status, body = health(app)
    jwks = app.test_client().get("/.well-known/jwks.json")

    assert (status, body["status"]) == (200, "degraded")
    assert not body["checks"]["signing"]["ok"]
    assert "transit/keys/not-made-yet" in body["checks"]["signing"]["error"]
    assert jwks.status_code == 503
    assert jwks.get_json()["error"] == "signing_key_unavailable"


def test_a_healthy_broker_names_its_signing_key(make_app):
    status, body = health(make_app())

    assert status == 200
    signing = body["checks"]["signing"]
    assert signing["ok"] and signing["key"] in signing["published"]
