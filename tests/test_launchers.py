"""The test harness itself: OpenBao answers with the root token, and the OIDC provider logs people
in through its form, requires PKCE and issues RFC 9068 JWT access tokens the broker can verify."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
import requests

from scripts.launchers import (
    AGENT_CLIENT_ID,
    API_RESOURCE,
    CLI_CLIENT_ID,
    CLI_REDIRECT_URI,
    WEB_CLIENT_ID,
    LoginFailed,
    OidcProvider,
    client_credentials_token,
    user_access_token,
    user_tokens,
)


def verified(provider: OidcProvider, token: str, audience: str = API_RESOURCE) -> dict:
    """Check a token the way the broker does: JWKS, pinned RS256, exact issuer and audience."""
    key = jwt.PyJWKClient(provider.metadata["jwks_uri"]).get_signing_key_from_jwt(token)
    return jwt.decode(
        token, key.key, algorithms=["RS256"], issuer=provider.issuer, audience=audience
    )


def test_openbao_accepts_its_root_token_and_keeps_secrets(openbao):
    client = openbao.client()
    assert "root" in client.auth.token.lookup_self()["data"]["policies"]
    client.secrets.kv.v2.create_or_update_secret("harness/check", {"answer": "42"})
    read = client.secrets.kv.v2.read_secret_version("harness/check", raise_on_deleted_version=True)
    assert read["data"]["data"] == {"answer": "42"}


def test_provider_publishes_discovery_and_public_keys_only(oidc_provider):
    metadata = oidc_provider.metadata
    assert metadata["issuer"] == oidc_provider.issuer
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "email", "profile", "groups"} <= set(metadata["scopes_supported"])
    keys = requests.get(metadata["jwks_uri"], timeout=5).json()["keys"]
    assert keys and all(k["kty"] == "RSA" and "d" not in k for k in keys)


def test_user_access_token_is_an_rfc9068_jwt_for_the_api(oidc_provider):
    token = user_access_token(oidc_provider, "alice")
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    unverified = jwt.decode(token, options={"verify_signature": False})
    assert unverified["sub"] == "alice"
    assert unverified["aud"] == API_RESOURCE
    assert unverified["groups"] == ["engineers"]
    claims = verified(oidc_provider, token)
    assert claims["client_id"] == CLI_CLIENT_ID
    assert claims["email"] == "alice@example.com"
    assert claims["name"] == "Alice Engineer"
    assert 500 <= claims["exp"] - claims["iat"] <= 700


def test_id_token_carries_the_requested_claims(oidc_provider):
    tokens = user_tokens(oidc_provider, "bob")
    claims = verified(oidc_provider, tokens["id_token"], audience=CLI_CLIENT_ID)
    assert claims["sub"] == "bob"
    assert claims["email"] == "bob@example.com" and claims["email_verified"] is True
    assert claims["preferred_username"] == "bob"
    assert claims["groups"] == ["engineers", "security"]


def test_unknown_username_gets_no_session(oidc_provider):
    with pytest.raises(LoginFailed, match="mallory") as refused:
        user_access_token(oidc_provider, "mallory")
    assert "Unknown user" in refused.value.page_text


def test_client_credentials_token_names_the_agent(oidc_provider):
    token = client_credentials_token(
        oidc_provider, AGENT_CLIENT_ID, oidc_provider.client_secret(AGENT_CLIENT_ID), API_RESOURCE
    )
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = verified(oidc_provider, token)
    assert claims["sub"] == claims["client_id"] == AGENT_CLIENT_ID
    assert "groups" not in claims and "email" not in claims


def test_token_requests_without_a_resource_get_the_api_by_default(oidc_provider):
    response = requests.post(
        oidc_provider.metadata["token_endpoint"],
        data={"grant_type": "client_credentials"},
        auth=(AGENT_CLIENT_ID, oidc_provider.client_secret(AGENT_CLIENT_ID)),
        timeout=10,
    )
    assert response.ok, response.text
    assert verified(oidc_provider, response.json()["access_token"])["sub"] == AGENT_CLIENT_ID


@pytest.mark.parametrize("client_id", [CLI_CLIENT_ID, WEB_CLIENT_ID])
def test_pkce_is_required_of_every_client(oidc_provider, broker_port, client_id):
    redirect_uri = (
        CLI_REDIRECT_URI
        if client_id == CLI_CLIENT_ID
        else f"http://127.0.0.1:{broker_port}/auth/callback"
    )
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid",
        "state": "s1",
        "nonce": "n1",
    }
    response = requests.get(
        f"{oidc_provider.metadata['authorization_endpoint']}?{urlencode(query)}",
        allow_redirects=False,
        timeout=10,
    )
    assert response.is_redirect
    location = response.headers["Location"]
    assert location.startswith(redirect_uri)
    params = parse_qs(urlsplit(location).query)
    assert params["error"] == ["invalid_request"]
    assert "PKCE" in params["error_description"][0]
    assert params["state"] == ["s1"]


def test_the_bench_runs_and_reports_ratios_with_an_intact_chain():
    """Not a timing test: the bench must keep working as the code under it changes."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
    result = subprocess.run(
        [sys.executable, str(bench), "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ratio" in result.stdout and "chain intact" in result.stdout


def test_a_provider_someone_else_started_can_be_logged_into(oidc_provider):
    """What `scripts/dev token USER` does with the dev stack's running provider."""
    running = OidcProvider(None, {"issuer": oidc_provider.issuer})
    token = user_access_token(running, "alice")
    assert verified(oidc_provider, token)["sub"] == "alice"
