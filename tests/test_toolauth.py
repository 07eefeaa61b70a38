"""broker/toolauth.py: what a tool checks of the broker's access tokens, against a real JWKS
server (ES256 keys of the test's own, as the broker's transit key will be) and a real little
introspection endpoint."""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import jwt
import pytest

from broker.errors import InsufficientScope, InvalidToken, ProviderUnavailable
from broker.toolauth import ClientCredentials, Introspection, ToolTokenVerifier, require_scope
from scripts.launchers import TOOL_CLIENT_ID, tool_secret
from tests.helpers import JwksServer, SigningKey, with_header

RESOURCE = "https://tools.internal/github"


@pytest.fixture(scope="module")
def broker_keys():
    key = SigningKey("transit-1", "ES256")
    server = JwksServer([key])
    yield server, key
    server.stop()


def task_token(server, key, **claims):
    body = {
        "aud": RESOURCE,
        "sub": "alice",
        "client_id": "ci-agent",
        "act": {"sub": "ci-agent"},
        "scope": "issues:read",
        "jti": "j-1",
        **claims,
    }
    return key.token(server.issuer, **body)


def verifier_for(server, resource=RESOURCE, **kwargs):
    return ToolTokenVerifier(server.issuer, f"{server.issuer}/jwks", resource, **kwargs)


def test_a_task_token_for_this_tool_verifies(broker_keys):
    server, key = broker_keys
    token = verifier_for(server).verify(task_token(server, key, scope="issues:read issues:write"))
    assert (token.subject, token.actor, token.client_id) == ("alice", "ci-agent", "ci-agent")
    assert token.scopes == {"issues:read", "issues:write"}
    require_scope(token, "issues:write")


def test_a_missing_scope_is_insufficient_scope(broker_keys):
    server, key = broker_keys
    token = verifier_for(server).verify(task_token(server, key))
    with pytest.raises(InsufficientScope) as refused:
        require_scope(token, "issues:write")
    assert (refused.value.status, refused.value.code) == (403, "insufficient_scope")
    assert refused.value.scope == "issues:write"


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "https://tools.internal/jira"},  # another tool's token
        {"aud": [RESOURCE, "https://tools.internal/jira"]},  # one that names others too
        {"aud": [RESOURCE]},  # exactly one aud, as a string
        {"iss": "https://elsewhere.example"},
        {"exp": int(time.time()) - 120},
        {"act": None},
        {"act": {"sub": ""}},
        {"act": "ci-agent"},
        {"scope": ["issues:read"]},
        {"sub": 7},
    ],
)
def test_a_token_not_made_for_this_tool_is_refused(broker_keys, claims):
    server, key = broker_keys
    with pytest.raises(InvalidToken) as refused:
        verifier_for(server).verify(task_token(server, key, **claims))
    assert (refused.value.status, refused.value.code) == (401, "invalid_token")


@pytest.mark.parametrize("claim", ["exp", "iat", "jti", "client_id", "scope", "act", "sub"])
def test_a_token_lacking_a_required_claim_is_refused(broker_keys, claim):
    server, key = broker_keys
    token = task_token(server, key)
    body = jwt.decode(token, options={"verify_signature": False})
    del body[claim]
    forged = jwt.encode(body, key.private, "ES256", headers={"typ": "at+jwt", "kid": key.kid})
    with pytest.raises(InvalidToken):
        verifier_for(server).verify(forged)


def test_wrong_signature_unknown_kid_and_bad_headers_are_refused(broker_keys):
    server, key = broker_keys
    stranger = SigningKey("transit-1", "ES256")  # same kid, another key
    verifier = verifier_for(server)
    for token in [
        task_token(server, stranger),
        task_token(server, SigningKey("transit-9", "ES256")),
        task_token(server, key)[:-4] + "AAAA",
        with_header(task_token(server, key), typ="JWT"),
        with_header(task_token(server, key), alg="none"),
        with_header(task_token(server, key), alg="HS256"),
        with_header(task_token(server, key), jku="https://evil.example/jwks"),
        "not a jwt",
        "é" * 10,
    ]:
        with pytest.raises(InvalidToken):
            verifier.verify(token)


def test_an_rsa_token_is_refused_even_from_a_listed_key():
    rsa_key = SigningKey("rsa-1")  # RS256: a broker never signs with it
    server = JwksServer([rsa_key])
    try:
        with pytest.raises(InvalidToken, match="algorithm"):
            verifier_for(server).verify(task_token(server, rsa_key))
    finally:
        server.stop()


def test_unknown_kids_do_not_refetch_the_jwks_each_time(broker_keys):
    server, key = broker_keys
    verifier = verifier_for(server)
    before = server.fetches
    verifier.verify(task_token(server, key))
    for n in range(5):
        with pytest.raises(InvalidToken):
            verifier.verify(task_token(server, SigningKey(f"made-up-{n}", "ES256")))
    assert server.fetches - before == 1  # the cooldown holds


def test_jwks_down_is_provider_unavailable_not_a_crash():
    key = SigningKey("transit-1", "ES256")
    server = JwksServer([key])
    server.status = 500
    try:
        with pytest.raises(ProviderUnavailable):
            verifier_for(server).verify(task_token(server, key))
    finally:
        server.stop()


def test_toolauth_imports_no_flask():
    code = "import sys, broker.toolauth; print('flask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- introspection (RFC 7662), the client side -----------------------------------------------


class Introspector:
    """A real HTTP endpoint playing the broker's POST /oauth/introspect."""

    def __init__(self):
        self.requests: list[tuple[dict, dict]] = []
        self.status, self.body = 200, {"active": True}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                server.requests.append((dict(self.headers), form))
                data = server.body if isinstance(server.body, bytes) else json.dumps(server.body)
                data = data.encode() if isinstance(data, str) else data
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/oauth/introspect"
        threading.Thread(target=self.http.serve_forever, args=(0.02,), daemon=True).start()

    def stop(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def introspector():
    server = Introspector()
    yield server
    server.stop()


def test_introspection_sends_the_token_with_the_tools_credentials(broker_keys, introspector):
    server, key = broker_keys
    token = task_token(server, key)
    introspect = Introspection(introspector.url, bearer=lambda: "the-tools-own-token")
    assert verifier_for(server, introspect=introspect).verify(token).subject == "alice"
    headers, form = introspector.requests[-1]
    assert headers["Authorization"] == "Bearer the-tools-own-token"  # its provider token
    assert form == {"token": [token], "token_type_hint": ["access_token"]}


@pytest.mark.parametrize("body", [{"active": False}, {"active": "true"}, {}, [True]])
def test_an_inactive_token_is_refused(broker_keys, introspector, body):
    server, key = broker_keys
    introspector.body = body
    verifier = verifier_for(server, introspect=Introspection(introspector.url, bearer=lambda: "t"))
    with pytest.raises(InvalidToken, match="no longer active"):
        verifier.verify(task_token(server, key))


def test_introspection_not_answering_fails_closed(broker_keys, introspector):
    server, key = broker_keys
    verifier = verifier_for(server, introspect=Introspection(introspector.url, bearer=lambda: "t"))
    introspector.status = 500
    with pytest.raises(ProviderUnavailable):
        verifier.verify(task_token(server, key))
    introspector.status, introspector.body = 200, b"<html>"
    with pytest.raises(ProviderUnavailable):
        verifier.verify(task_token(server, key))
    introspector.stop()
    with pytest.raises(ProviderUnavailable):
        verifier.verify(task_token(server, key))


def test_a_token_refused_locally_is_never_sent_to_introspection(broker_keys, introspector):
    server, key = broker_keys
    verifier = verifier_for(server, introspect=Introspection(introspector.url, bearer=lambda: "t"))
    with pytest.raises(InvalidToken):
        verifier.verify(task_token(server, key, aud="https://tools.internal/jira"))
    assert introspector.requests == []


def test_a_refused_tool_token_is_fetched_again_once(broker_keys, introspector):
    server, key = broker_keys

    class Bearer:
        def __init__(self):
            self.tokens, self.forgotten = iter(["stale", "fresh", "fresher"]), 0
            self.current = next(self.tokens)

        def __call__(self):
            return self.current

        def forget(self):
            self.forgotten += 1
            self.current = next(self.tokens)

    bearer = Bearer()
    verifier = verifier_for(server, introspect=Introspection(introspector.url, bearer=bearer))
    introspector.status = 401
    with pytest.raises(ProviderUnavailable, match="401"):
        verifier.verify(task_token(server, key))
    assert bearer.forgotten == 1  # once, not in a loop
    sent = [headers["Authorization"] for headers, _ in introspector.requests]
    assert sent == ["Bearer stale", "Bearer fresh"]


# --- the tool's own token from the OIDC provider (client credentials) -------------------------


def own_token(oidc_provider, oidc_client_secret, secret=None, **kwargs):
    return ClientCredentials(
        oidc_provider.issuer,
        TOOL_CLIENT_ID,
        secret or tool_secret(oidc_client_secret),
        oidc_provider.api_resource,
        **kwargs,
    )


def test_the_tools_own_token_is_cached_until_shortly_before_exp(oidc_provider, oidc_client_secret):
    now = [time.time()]
    fetch = own_token(oidc_provider, oidc_client_secret, margin=30, clock=lambda: now[0])
    first = fetch()
    claims = jwt.decode(first, options={"verify_signature": False})
    assert claims["client_id"] == TOOL_CLIENT_ID and claims["aud"] == oidc_provider.api_resource
    assert fetch() == first  # cached
    now[0] = claims["exp"] - 31
    assert fetch() == first
    now[0] = claims["exp"] - 29  # inside the margin: a new one
    second = fetch()
    assert second != first and jwt.decode(second, options={"verify_signature": False})["jti"]
    fetch.forget()
    assert fetch() not in (first, second)


def test_the_provider_refusing_the_tool_is_provider_unavailable(oidc_provider, oidc_client_secret):
    with pytest.raises(ProviderUnavailable, match="token endpoint answered 401"):
        own_token(oidc_provider, oidc_client_secret, secret="wrong")()
    unreachable = ClientCredentials("http://127.0.0.1:9", "t", "s", "urn:x", timeout=1)
    with pytest.raises(ProviderUnavailable, match="cannot reach the provider"):
        unreachable()
