"""The JSON API end to end: real access tokens from the OIDC provider, real tokens from OpenBao,
the real reaper thread."""

import time
from datetime import timedelta

import jwt
import pytest
import requests
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.cli import main as jit
from broker.models import parse_time
from scripts.launchers import (
    OidcProvider,
    agent_secret,
    client_credentials_token,
    free_port,
    provider_config,
    user_access_token,
    user_tokens,
)
from tests.helpers import (
    EXPIRING_AGENT,
    JwksServer,
    token_works,
    types,
    vault_as,
    wait_for_status,
    with_header,
)


def call(broker, token, method, path, body=None, raw=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(
        method, broker.url + path, json=body, data=raw, headers=headers, timeout=15
    )


def ask(broker, token, duration, reason, entitlement="kv-read"):
    body = {"entitlement": entitlement, "duration": duration, "reason": reason}
    return call(broker, token, "POST", "/api/v1/requests", body)


def test_request_issues_a_token_that_ends_exactly_at_the_window_end(broker, tokens, openbao):
    response = ask(broker, tokens("alice"), "10m", "INC-1 debugging")
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["status"] == "active"
    start, end = parse_time(body["window"]["start"]), parse_time(body["window"]["end"])
    assert (end - start).total_seconds() == 600
    secret = body["credential"]["token"]
    looked_up = vault_as(openbao, secret).auth.token.lookup_self()["data"]
    assert looked_up["explicit_max_ttl"] in (599, 600)
    assert looked_up["renewable"] is False
    # Vault counts in whole seconds: the token ends on the window's last second, or one before.
    expires = parse_time(looked_up["expire_time"][:19] + "Z")
    assert end - timedelta(seconds=1) <= expires <= end
    assert "jit-test-read" in looked_up["policies"]
    assert token_works(openbao, secret)
    assert response.headers["Location"] == f"/api/v1/requests/{body['id']}"

    # The secret is shown once: never again through the API, never in the store or the log.
    again = call(broker, tokens("alice"), "GET", f"/api/v1/requests/{body['id']}").json()
    assert again["status"] == "active" and "credential" not in again
    mine = call(broker, tokens("alice"), "GET", "/api/v1/requests?mine=1").json()["requests"]
    assert body["id"] in [grant["id"] for grant in mine]
    assert secret not in str(mine) and secret not in str(broker.grants.chain(body["id"]))
    assert broker.grants.store.get_grant(body["id"]).handle not in str(
        broker.grants.chain(body["id"])
    )


def test_a_grant_expires_and_its_token_stops_working(broker, tokens, openbao):
    response = ask(broker, tokens("alice"), "3s", "short task")
    assert response.status_code == 201, response.text
    grant_id, secret = response.json()["id"], response.json()["credential"]["token"]
    assert token_works(openbao, secret)

    grant = wait_for_status(broker.grants, grant_id, "revoked")
    assert not token_works(openbao, secret)
    assert grant.window_end == response.json()["window"]["end"]
    steps = ["request", "decision", "issue", "expire", "revoke", "verify"]
    assert types(broker.grants, grant_id) == steps, broker.grants.chain(grant_id)
    verify = broker.grants.chain(grant_id)[-1]["data"]
    assert verify["gone"] is True

    config = broker.app.extensions["jit"].settings
    runner = CliRunner()
    result = runner.invoke(jit, ["audit", "verify"], env=_cli_env(config))
    assert result.exit_code == 0, result.output
    assert "chain intact" in result.output
    shown = runner.invoke(jit, ["audit", "show", grant_id], env=_cli_env(config))
    assert shown.exit_code == 0, shown.output
    for step in ("request", "decision", "issue", "expire", "revoke", "verify"):
        assert f" {step} " in shown.output


def _cli_env(settings):
    """What an auditor's `jit` needs to read this broker's log: the database, the data directory
    (the HMAC key) and OpenBao, whose transit key checks the checkpoints the live broker's reaper
    signs as it runs (without it, a signed checkpoint cannot be checked and verify fails)."""
    return {
        "JIT_STORAGE_PATH": str(settings.database_path),
        "JIT_STORAGE_URL": settings.storage["url"],
        "JIT_SERVER_DATA_DIR": str(settings.data_dir),
        "JIT_VAULT_ADDR": settings.vault["addr"],
        "JIT_VAULT_TOKEN": settings.vault["token"],
    }


def test_release_revokes_at_once(broker, tokens, openbao):
    response = ask(broker, tokens("alice"), "1h", "done early")
    grant_id, secret = response.json()["id"], response.json()["credential"]["token"]
    released = call(broker, tokens("alice"), "POST", f"/api/v1/requests/{grant_id}/release")
    assert released.status_code == 200, released.text
    assert released.json()["status"] in {"released", "revoking", "revoked"}

    wait_for_status(broker.grants, grant_id, "revoked", timeout=10)
    assert not token_works(openbao, secret)
    assert types(broker.grants, grant_id)[-3:] == ["release", "revoke", "verify"]

    again = call(broker, tokens("alice"), "POST", f"/api/v1/requests/{grant_id}/release")
    assert again.status_code == 409
    assert again.json()["error"] == "conflict"


def test_release_waiting_for_verified_answers_once_the_token_is_gone(broker, tokens, openbao):
    """Issue 15: ?wait=verified removes in the request, claimed as the reaper claims, and
    answers `revoked` only once OpenBao no longer knows the token."""
    response = ask(broker, tokens("alice"), "1h", "done early")
    grant_id, secret = response.json()["id"], response.json()["credential"]["token"]
    released = call(
        broker, tokens("alice"), "POST", f"/api/v1/requests/{grant_id}/release?wait=verified"
    )
    assert released.status_code == 200, released.text
    assert released.json()["status"] == "revoked"
    assert not token_works(openbao, secret)
    assert types(broker.grants, grant_id)[-3:] == ["release", "revoke", "verify"]


def test_release_refuses_an_unknown_wait(broker, tokens):
    response = ask(broker, tokens("alice"), "1h", "done early")
    grant_id = response.json()["id"]
    released = call(broker, tokens("alice"), "POST", f"/api/v1/requests/{grant_id}/release?wait=1")
    assert released.status_code == 400
    assert (
        call(broker, tokens("alice"), "GET", f"/api/v1/requests/{grant_id}").json()["status"]
        == "active"
    )


def test_nobody_sees_or_releases_another_persons_grant(broker, tokens):
    grant_id = ask(broker, tokens("alice"), "5m", "mine").json()["id"]
    assert call(broker, tokens("bob"), "GET", f"/api/v1/requests/{grant_id}").status_code == 404
    stolen = call(broker, tokens("bob"), "POST", f"/api/v1/requests/{grant_id}/release")
    assert stolen.status_code == 404
    bobs = call(broker, tokens("bob"), "GET", "/api/v1/requests?mine=1").json()["requests"]
    assert grant_id not in [grant["id"] for grant in bobs]
    assert broker.grants.store.get_grant(grant_id).status == "active"
    call(broker, tokens("alice"), "POST", f"/api/v1/requests/{grant_id}/release")


def test_entitlements_lists_what_the_caller_may_request(broker, tokens):
    def names(user):
        listed = call(broker, tokens(user), "GET", "/api/v1/entitlements").json()
        return [entitlement["name"] for entitlement in listed["entitlements"]]

    assert names("alice") == ["kv-read"]
    assert names("bob") == ["kv-read", "kv-admin"]
    assert names("carol") == []


@pytest.mark.parametrize(
    ("user", "body", "status", "error"),
    [
        (
            "alice",
            {"entitlement": "nope", "duration": "5m", "reason": "x"},
            404,
            "unknown_entitlement",
        ),
        (
            "alice",
            {"entitlement": "kv-read", "duration": "2h", "reason": "x"},
            422,
            "duration_too_long",
        ),
        (
            "alice",
            {"entitlement": "kv-read", "duration": "0", "reason": "x"},
            400,
            "invalid_duration",
        ),
        (
            "alice",
            {"entitlement": "kv-read", "duration": -60, "reason": "x"},
            400,
            "invalid_duration",
        ),
        (
            "alice",
            {"entitlement": "kv-read", "duration": "soon", "reason": "x"},
            400,
            "invalid_duration",
        ),
        ("alice", {"entitlement": "kv-read", "reason": "x"}, 400, "invalid_duration"),
        ("alice", {"entitlement": "kv-read", "duration": "5m"}, 400, "invalid_request"),
        (
            "alice",
            {"entitlement": "kv-read", "duration": "5m", "reason": "   "},
            400,
            "invalid_request",
        ),
        ("alice", {"duration": "5m", "reason": "x"}, 400, "invalid_request"),
        ("alice", ["not", "an", "object"], 400, "invalid_request"),
        ("carol", {"entitlement": "kv-read", "duration": "5m", "reason": "x"}, 403, "not_eligible"),
        (
            "alice",
            {"entitlement": "kv-admin", "duration": "5m", "reason": "x"},
            403,
            "not_eligible",
        ),
    ],
)
def test_bad_requests_get_a_clear_error_and_change_nothing(
    broker, tokens, openbao, user, body, status, error
):
    before = _footprint(broker, openbao)
    response = call(broker, tokens(user), "POST", "/api/v1/requests", body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"]
    grants, entries, accessors = _footprint(broker, openbao)
    assert (grants, entries) == before[:2]
    assert accessors <= before[2], "a Vault token was created for a refused request"


def _footprint(broker, openbao):
    db = broker.grants.store.db
    accessors = set(openbao.client().list("auth/token/accessors")["data"]["keys"])
    return (
        db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"],
        # The shared broker's reaper may write for other tests' grants meanwhile: not this request.
        sum(
            1 for entry in broker.grants.store.audit_entries() if entry["actor"]["sub"] != "reaper"
        ),
        accessors,
    )


def test_a_body_that_is_not_json_is_refused(broker, tokens):
    response = call(broker, tokens("alice"), "POST", "/api/v1/requests", raw="entitlement=kv-read")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_an_unknown_grant_is_404(broker, tokens):
    response = call(broker, tokens("alice"), "GET", "/api/v1/requests/does-not-exist")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


def _resigned(token: str, **header) -> str:
    """The same claims under another signature: what a forger with their own key produces."""
    claims = jwt.decode(token, options={"verify_signature": False})
    original = jwt.get_unverified_header(token)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, key, algorithm="RS256", headers={**original, **header})


def _unsigned(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, None, algorithm="none", headers={"typ": "at+jwt"})


@pytest.mark.parametrize(
    ("make", "has_error_code"),
    [
        (lambda t: None, False),
        (lambda t: "garbage", True),
        (_resigned, True),
        (_unsigned, True),
        (lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"), True),
    ],
    ids=["missing", "garbage", "wrongly-signed", "alg-none", "tampered-signature"],
)
def test_bad_bearer_tokens_are_401_with_a_challenge(broker, tokens, make, has_error_code):
    response = call(broker, make(tokens("alice")), "GET", "/api/v1/requests?mine=1")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="jit-broker"')
    assert ('error="invalid_token"' in challenge) == has_error_code


def _signed_by_us(token: str, key=None, alg: str = "RS256", **header) -> str:
    """The token's claims signed with a key of the test's, under the original header plus
    `header` (None: left out): a forger who also controls what the header says."""
    claims = jwt.decode(token, options={"verify_signature": False})
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = {**jwt.get_unverified_header(token), **header}
    headers.pop("alg")
    return jwt.encode(
        claims, key, algorithm=alg, headers={k: v for k, v in headers.items() if v is not None}
    )


EC_KEY = ec.generate_private_key(ec.SECP256R1())
FORGER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FORGER_JWK = jwt.algorithms.RSAAlgorithm.to_jwk(FORGER_KEY.public_key(), as_dict=True)

MALFORMED = {
    "kid-number": lambda t, _: with_header(t, kid=5),
    "kid-list": lambda t, _: with_header(t, kid=["a"]),
    "kid-object": lambda t, _: with_header(t, kid={"k": 1}),
    "kid-null": lambda t, _: with_header(t, kid=None),
    "kid-empty": lambda t, _: with_header(t, kid=""),
    "crit-unknown": lambda t, _: with_header(t, crit=["urn:example:ext"]),
    "crit-not-a-list": lambda t, _: with_header(t, crit="exp"),
    "crit-empty": lambda t, _: with_header(t, crit=[]),
    "crit-b64-false": lambda t, _: with_header(t, crit=["b64"], b64=False),
    "es256-header-with-the-rsa-kid": lambda t, _: _signed_by_us(t, EC_KEY, "ES256"),
    "header-array": lambda t, _: with_header(t, ["RS256", "at+jwt"]),
    "header-number": lambda t, _: with_header(t, 42),
    "header-string": lambda t, _: with_header(t, "RS256"),
    "header-null": lambda t, _: with_header(t, raw=b"null"),
    "header-not-json": lambda t, _: with_header(t, raw=b"{alg: RS256"),
    "header-deeply-nested": lambda t, _: with_header(
        t, raw=b'{"alg":"RS256","x":' + b"[" * 3000 + b"]" * 3000 + b"}"
    ),
    "header-not-base64": lambda t, _: "!!!." + t.split(".", 1)[1],
    "typ-list": lambda t, _: with_header(t, typ=["at+jwt"]),
    "typ-number": lambda t, _: with_header(t, typ=1),
    "alg-list": lambda t, _: with_header(t, alg=["RS256"]),
    "alg-object": lambda t, _: with_header(t, alg={"RS256": 1}),
    "alg-with-a-newline": lambda t, _: with_header(t, alg="RS256\r\nX-Evil: 1"),
    "alg-non-ascii": lambda t, _: with_header(t, alg='RS256\u2028\u00e9"\\'),
    "huge": lambda t, _: t + "A" * 60_000,
    "non-ascii-latin-1": lambda t, _: t + "\u00e9",
    "non-ascii-utf-8-bytes": lambda t, _: (t + "\u00e9\u2603").encode(),
    "five-segments": lambda t, _: t + ".e30.e30",
    "two-segments": lambda t, _: t.rsplit(".", 1)[0],
    "jku": lambda t, server: _signed_by_us(t, FORGER_KEY, jku=f"{server.issuer}/jwks"),
    "x5u": lambda t, server: _signed_by_us(t, FORGER_KEY, x5u=f"{server.issuer}/cert.pem"),
    "jwk": lambda t, _: _signed_by_us(t, FORGER_KEY, jwk=dict(FORGER_JWK, use="sig")),
    "jwk-without-a-kid": lambda t, _: _signed_by_us(t, FORGER_KEY, kid=None, jwk=FORGER_JWK),
}


@pytest.fixture(scope="module")
def forgers_jwks():
    """Where a forged token's jku/x5u point: it must never be asked."""
    server = JwksServer([])
    yield server
    server.stop()


@pytest.mark.parametrize("shape", list(MALFORMED))
def test_malformed_tokens_are_401_with_a_challenge(broker, tokens, forgers_jwks, shape):
    token = MALFORMED[shape](tokens("alice"), forgers_jwks)
    response = call(broker, token, "GET", "/api/v1/requests?mine=1")
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthenticated" and response.json()["detail"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="jit-broker", error="invalid_token"')
    assert challenge.isascii() and "\\" not in challenge and challenge.count('"') == 6
    assert forgers_jwks.fetches == 0
    # The same token's real, untouched sibling still works: nothing was poisoned.
    assert call(broker, tokens("alice"), "GET", "/api/v1/requests?mine=1").status_code == 200


def test_the_providers_access_tokens_carry_client_id(tokens, oidc_provider, oidc_client_secret):
    """RFC 9068 §2.2: the broker requires client_id, so the real provider must send it."""
    user = jwt.decode(tokens("alice"), options={"verify_signature": False})
    assert user["client_id"] == "jit-cli"
    agent = client_credentials_token(
        oidc_provider, "ci-agent", agent_secret(oidc_client_secret), oidc_provider.api_resource
    )
    claims = jwt.decode(agent, options={"verify_signature": False})
    assert claims["client_id"] == claims["sub"] == "ci-agent"
    assert claims.get("azp", "ci-agent") == "ci-agent"


def test_an_id_token_is_not_an_access_token(broker, oidc_provider):
    id_token = user_tokens(oidc_provider, "alice")["id_token"]
    response = call(broker, id_token, "GET", "/api/v1/requests?mine=1")
    assert response.status_code == 401
    assert "access token" in response.json()["detail"]


def test_a_token_for_another_audience_is_refused(make_app, tokens):
    client = make_app(oidc={"api_audience": "urn:someone-else"}).test_client()
    response = client.get(
        "/api/v1/requests", headers={"Authorization": f"Bearer {tokens('alice')}"}
    )
    assert response.status_code == 401
    assert "audience" in response.json["detail"].lower()


def test_a_token_from_another_issuer_is_refused(broker, tmp_path, broker_port, oidc_client_secret):
    other = OidcProvider.start(
        provider_config(
            free_port(), f"http://127.0.0.1:{broker_port}/auth/callback", oidc_client_secret
        ),
        tmp_path,
    )
    try:
        foreign = user_access_token(other, "alice")
    finally:
        other.stop()
    response = call(broker, foreign, "GET", "/api/v1/requests?mine=1")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_an_expired_token_is_refused(make_app, oidc_provider, oidc_client_secret):
    client = make_app(oidc={"leeway": 0}).test_client()
    token = client_credentials_token(
        oidc_provider, EXPIRING_AGENT, oidc_client_secret, oidc_provider.api_resource
    )
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/requests", headers=bearer).status_code == 200
    time.sleep(
        max(0, jwt.decode(token, options={"verify_signature": False})["exp"] + 1.1 - time.time())
    )
    response = client.get("/api/v1/requests", headers=bearer)
    assert response.status_code == 401
    assert "expired" in response.json["detail"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_vault_down_is_503_and_nothing_is_recorded_as_issued(make_app, tokens):
    app = make_app(vault={"addr": f"http://127.0.0.1:{free_port()}", "timeout": 2})
    response = app.test_client().post(
        "/api/v1/requests",
        json={"entitlement": "kv-read", "duration": "5m", "reason": "x"},
        headers={"Authorization": f"Bearer {tokens('alice')}"},
    )
    assert response.status_code == 503
    assert response.json["error"] == "vault_unavailable"
    grants = app.extensions["jit"].grants
    rows = grants.store.db.execute("SELECT id, status, handle FROM grants").fetchall()
    assert [(row["status"], row["handle"]) for row in rows] == [("issue_failed", "")]
    assert types(grants, rows[0]["id"]) == ["request", "decision", "issue_failed"]
