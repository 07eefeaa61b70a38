"""private_key_jwt client authentication at the token and revocation endpoints (issue 12, item 3;
RFC 7523 §2.2 and §3, RFC 8725): agents' keys registered in [oauth.clients], served as a JWKS by a
real local HTTP server or given inline; a task started by a person through the API; the tokens
checked with broker.toolauth against the broker's served JWKS. Every refused assertion is a 401
invalid_client that leaves no token row and no chain entry; a jti is good once, across threads
and across two broker processes on one database."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time

import jwt
import pytest

from broker.backends.tool_task import SUBJECT_TOKEN_TYPE
from broker.oauth.clients import PRIVATE_KEY_JWT_ISSUER
from broker.toolauth import ToolTokenVerifier
from tests.helpers import (
    TASK_GITHUB,
    TASK_TOOLS,
    TRIAGE_TASK,
    JwksServer,
    SigningKey,
    broker_sections,
    grants_of,
)

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
POLICY = TASK_TOOLS + TRIAGE_TASK
# ci-agent's keys: an ES256 one behind its jwks_uri, an RS256 one inline; other-agent's inline.
AGENT_ES = SigningKey("ci-agent-es", "ES256")
AGENT_RS = SigningKey("ci-agent-rs", "RS256")
OTHER = SigningKey("other-agent-1", "ES256")


@pytest.fixture(scope="module")
def agent_jwks():
    server = JwksServer([AGENT_ES])
    yield server
    server.stop()


def clients(agent_jwks) -> dict:
    return {
        "ci-agent": {"jwks_uri": f"{agent_jwks.issuer}/jwks", "jwks": {"keys": [AGENT_RS.jwk()]}},
        "other-agent": {"jwks": {"keys": [OTHER.jwk()]}},
    }


@pytest.fixture
def app(make_app, agent_jwks):
    return make_app(policy_text=POLICY, oauth={"clients": clients(agent_jwks)})


@pytest.fixture
def task(app, api_for):
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "triage the new issues",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"]},
    }
    response = api_for(app)("POST", "/api/v1/requests", body)
    assert response.status_code == 201, response.json
    return response.json


def issuer_of(app) -> str:
    return app.extensions["jit"].signer.issuer


def token_url(app) -> str:
    return issuer_of(app) + "/oauth/token"


def good(app, key=AGENT_ES, **claims) -> str:
    return key.assertion("ci-agent", token_url(app), **claims)


def form_for(task, assertion, **changes) -> dict:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": task["credential"]["subject_token"],
        "subject_token_type": SUBJECT_TOKEN_TYPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
        "resource": TASK_GITHUB,
        "scope": "issues:read",
    }
    form.update(changes)
    return {name: value for name, value in form.items() if value is not None}


def exchange(app, task, assertion, **changes):
    return app.test_client().post("/oauth/token", data=form_for(task, assertion, **changes))


def recorded_tokens(app) -> list[dict]:
    rows = grants_of(app).store.db.execute("SELECT * FROM access_tokens").fetchall()
    return [dict(row) for row in rows]


def verified(app, token: str):
    """The token as a tool checks it: broker.toolauth against the JWKS the broker serves."""
    client = app.test_client()

    class Keys:
        def get(self, kid):
            document = client.get("/.well-known/jwks.json").json
            return {k["kid"]: jwt.PyJWK(k) for k in document["keys"]}.get(kid)

    return ToolTokenVerifier(issuer_of(app), "", TASK_GITHUB, keys=Keys()).verify(token)  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "audience"), [(AGENT_ES, "token"), (AGENT_RS, "issuer")])
def test_a_good_assertion_gets_a_token_for_the_tool(app, task, key, audience):
    """ES256 with the key from the agent's jwks_uri, RS256 with its inline key; `aud` the token
    endpoint or the issuer. The token is the same as the actor_token path gives."""
    aud = token_url(app) if audience == "token" else issuer_of(app)
    response = exchange(app, task, key.assertion("ci-agent", aud))
    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    token = verified(app, response.json["access_token"])
    assert (token.subject, token.actor, token.client_id) == ("alice", "ci-agent", "ci-agent")
    assert token.scopes == {"issues:read"}
    (row,) = recorded_tokens(app)
    assert (row["grant_id"], row["agent"]) == (task["id"], "ci-agent")
    entry = grants_of(app).chain(task["id"])[-1]
    assert entry["type"] == "token_issued"
    # The chain says how the agent authenticated: the broker's own registration vouched for it.
    assert entry["actor"] == {"iss": PRIVATE_KEY_JWT_ISSUER, "sub": "ci-agent"}


def _b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(app) -> str:
    """alg none: a header and claims, no signature (RFC 8725 §3.1)."""
    now = int(time.time())
    claims = {"iss": "ci-agent", "sub": "ci-agent", "aud": token_url(app), "exp": now + 60}
    return f"{_b64({'alg': 'none', 'kid': AGENT_ES.kid})}.{_b64(dict(claims, jti='n'))}."


def mac_signed(app) -> str:
    """HS256 with the agent's public key as the secret (the classic key-confusion attack)."""
    now = int(time.time())
    claims = {"iss": "ci-agent", "sub": "ci-agent", "aud": token_url(app), "exp": now + 60}
    secret = json.dumps(AGENT_ES.jwk()).encode()
    signing_input = f"{_b64({'alg': 'HS256', 'kid': AGENT_ES.kid})}.{_b64(dict(claims, jti='h'))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


STRANGER = SigningKey(AGENT_ES.kid, "ES256")  # the agent's kid, not its key
BAD_ASSERTIONS = {
    "expired": lambda app: good(app, iat=int(time.time()) - 200, exp=int(time.time()) - 100),
    "living an hour": lambda app: good(app, exp=int(time.time()) + 3600),
    "issued long before": lambda app: good(app, iat=int(time.time()) - 400),
    "no exp": lambda app: good(app, exp=None),
    "exp not a number": lambda app: good(app, exp="soon"),
    "exp NaN": lambda app: good(app, exp=float("nan")),
    "no jti": lambda app: good(app, jti=None),
    "jti not text": lambda app: good(app, jti=12),
    "aud elsewhere": lambda app: good(app, aud="https://elsewhere.example/oauth/token"),
    "aud issuer with slash": lambda app: good(app, aud=issuer_of(app) + "/"),
    "aud one of two": lambda app: good(app, aud=[token_url(app), "https://evil.example"]),
    "no aud": lambda app: good(app, aud=None),
    "iss not sub": lambda app: good(app, iss="other-agent"),
    "unknown client": lambda app: AGENT_ES.assertion("nobody", token_url(app)),
    "another agent's key": lambda app: OTHER.assertion("ci-agent", token_url(app)),
    "a stranger's key": lambda app: STRANGER.assertion("ci-agent", token_url(app)),
    "unknown kid": lambda app: good(app, headers={"kid": "made-up"}),
    "no kid": lambda app: AGENT_ES.assertion("ci-agent", token_url(app), headers={"kid": None}),
    "ES256 naming the RSA key": lambda app: good(app, headers={"kid": AGENT_RS.kid}),
    "RS512": lambda app: jwt.encode(
        {"iss": "ci-agent", "sub": "ci-agent", "aud": token_url(app), "jti": "r"}
        | {"exp": int(time.time()) + 60},
        AGENT_RS.private,
        algorithm="RS512",
        headers={"kid": AGENT_RS.kid},
    ),
    "alg none": unsigned,
    "HS256 with the public key": mac_signed,
    "jku header": lambda app: good(app, headers={"jku": "https://evil.example/jwks"}),
    "crit header": lambda app: good(app, headers={"crit": ["exp"]}),
    "signature of another assertion": lambda app: ".".join(
        good(app).split(".")[:2] + [good(app, sub="x").split(".")[2]]
    ),
    "not a JWT": lambda app: "not-a-jwt",
    "three dots of junk": lambda app: "a.b.c",
    "claims not an object": lambda app: f"{_b64({'alg': 'ES256', 'kid': 'k'})}.{_b64(b'[1]')}.x",
    "not ASCII": lambda app: "é" * 40,
}


@pytest.mark.parametrize("name", list(BAD_ASSERTIONS))
def test_a_bad_assertion_is_invalid_client_and_records_nothing(app, task, name):
    before = len(grants_of(app).chain(task["id"]))
    response = exchange(app, task, BAD_ASSERTIONS[name](app))
    assert (response.status_code, response.json["error"]) == (401, "invalid_client"), response.json
    assert response.headers["Cache-Control"] == "no-store"
    assert "access_token" not in response.json
    assert recorded_tokens(app) == []
    assert len(grants_of(app).chain(task["id"])) == before


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"client_assertion_type": "urn:x"}, 401, "invalid_client"),
        ({"client_assertion_type": None}, 401, "invalid_client"),
        ({"client_id": "other-agent"}, 401, "invalid_client"),
        ({"actor_token": "x", "actor_token_type": SUBJECT_TOKEN_TYPE}, 400, "invalid_request"),
    ],
)
def test_the_assertion_parameters_must_agree(app, task, changes, status, error):
    response = exchange(app, task, good(app), **changes)
    assert (response.status_code, response.json["error"]) == (status, error), response.json
    assert recorded_tokens(app) == []


def test_client_id_naming_the_agent_itself_is_accepted(app, task):
    assert exchange(app, task, good(app), client_id="ci-agent").status_code == 200


def test_another_agent_cannot_exchange_the_task(app, task):
    response = exchange(app, task, OTHER.assertion("other-agent", token_url(app)))
    assert (response.status_code, response.json["error"]) == (400, "invalid_grant"), response.json
    assert recorded_tokens(app) == []


def test_a_replayed_assertion_is_refused(app, task):
    assertion = good(app)
    assert exchange(app, task, assertion).status_code == 200
    again = exchange(app, task, assertion)
    assert (again.status_code, again.json["error"]) == (401, "invalid_client"), again.json
    assert len(recorded_tokens(app)) == 1


def test_a_jti_is_one_agents_not_every_agents(app, task):
    """The jti is unique per client (RFC 7519 §4.1.7): the same value from another agent is
    another assertion."""
    assert exchange(app, task, good(app, jti="shared")).status_code == 200
    theirs = OTHER.assertion("other-agent", token_url(app), jti="shared")
    assert exchange(app, task, theirs).json["error"] == "invalid_grant"  # authenticated


def test_one_assertion_from_16_threads_at_once_gives_one_token(app, task):
    assertion = good(app)
    barrier = threading.Barrier(16)
    answers: list[tuple[int, dict]] = []

    def send():
        client = app.test_client()
        barrier.wait()
        response = client.post("/oauth/token", data=form_for(task, assertion))
        answers.append((response.status_code, response.json))

    workers = [threading.Thread(target=send) for _ in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(status for status, _ in answers) == [200] + [401] * 15, answers
    assert {body["error"] for status, body in answers if status == 401} == {"invalid_client"}
    assert len(recorded_tokens(app)) == 1
    issued = [e for e in grants_of(app).chain(task["id"]) if e["type"] == "token_issued"]
    assert len(issued) == 1


SECOND_BROKER = """
import json, sys, threading
from broker import create_app
from broker.config import load_settings

app = create_app(load_settings(overrides=json.loads(sys.argv[1]), environ={}))
print("ready", flush=True)
form = json.loads(sys.stdin.readline())
statuses = []

def send():
    statuses.append(app.test_client().post("/oauth/token", data=form).status_code)

workers = [threading.Thread(target=send) for _ in range(8)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
app.extensions["jit"].stop()
print(json.dumps(statuses), flush=True)
"""


def test_one_assertion_at_two_broker_processes_on_one_database_gives_one_token(
    app, task, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, agent_jwks
):
    """A second broker, a real OS process on the same data directory and database, gets the same
    assertion at the same moment as this one: one token between them."""
    sections = broker_sections(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret)
    sections["reaper"] = {"enabled": False}
    sections["oauth"] = {"clients": clients(agent_jwks)}
    second = subprocess.Popen(
        [sys.executable, "-c", SECOND_BROKER, json.dumps(sections)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert second.stdout.readline().strip() == "ready", second.stderr.read()
        form = form_for(task, good(app))
        statuses: list[int] = []

        def send():
            statuses.append(app.test_client().post("/oauth/token", data=form).status_code)

        workers = [threading.Thread(target=send) for _ in range(8)]
        second.stdin.write(json.dumps(form) + "\n")
        second.stdin.flush()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
    finally:
        if second.poll() is None:
            second.kill()
    theirs = json.loads(out.splitlines()[-1])
    assert sorted(statuses + theirs) == [200] + [401] * 15, (statuses, theirs)
    assert len(recorded_tokens(app)) == 1


def test_expired_jtis_are_deleted(app, task):
    """A jti is kept only until its assertion has expired; the next one to arrive sweeps it."""
    grants = grants_of(app)
    now = int(time.time())
    assert grants.first_use("ci-agent", "old", now - 1)
    assert grants.first_use("ci-agent", "recent", now + 60)
    assert not grants.first_use("ci-agent", "recent", now + 60)
    assert exchange(app, task, good(app)).status_code == 200  # sweeps while recording its own
    rows = grants.store.db.execute("SELECT until FROM assertion_jtis").fetchall()
    assert len(rows) == 2 and all(row["until"] >= now for row in rows)


def test_the_agent_revokes_its_token_with_private_key_jwt(app, task, make_app):
    token = exchange(app, task, good(app)).json["access_token"]
    client = app.test_client()
    form = {"token": token, "client_assertion_type": JWT_BEARER, "client_assertion": good(app)}
    assert client.post("/oauth/revoke", data=form).status_code == 200
    assert grants_of(app).chain(task["id"])[-1]["type"] == "token_revoked"
    assert grants_of(app).chain(task["id"])[-1]["actor"]["iss"] == PRIVATE_KEY_JWT_ISSUER
    assert recorded_tokens(app)[0]["revoked_at"] != ""
    assert not grants_of(app).token_active(verified_jti(token), 2**40)
    # A replayed assertion at the revocation endpoint: invalid_client, nothing more recorded.
    before = len(grants_of(app).chain(task["id"]))
    again = client.post("/oauth/revoke", data=form)
    assert (again.status_code, again.json["error"]) == (401, "invalid_client")
    assert len(grants_of(app).chain(task["id"])) == before


def verified_jti(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["jti"]


def test_another_agent_revokes_nothing(app, task):
    token = exchange(app, task, good(app)).json["access_token"]
    form = {
        "token": token,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": OTHER.assertion("other-agent", token_url(app)),
    }
    assert app.test_client().post("/oauth/revoke", data=form).status_code == 200
    assert recorded_tokens(app)[0]["revoked_at"] == ""


@pytest.mark.parametrize("name", ["expired", "aud elsewhere", "alg none", "unknown client"])
def test_a_bad_assertion_at_revocation_is_invalid_client(app, task, name):
    token = exchange(app, task, good(app)).json["access_token"]
    form = {
        "token": token,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": BAD_ASSERTIONS[name](app),
    }
    response = app.test_client().post("/oauth/revoke", data=form)
    assert (response.status_code, response.json["error"]) == (401, "invalid_client")
    assert recorded_tokens(app)[0]["revoked_at"] == ""


def test_an_unreachable_jwks_uri_is_invalid_client(make_app, api_for, agent_jwks):
    """The agent's key server down (its key not cached): the agent cannot authenticate; the
    broker answers 401, not 500 or 503."""
    app = make_app(
        policy_text=POLICY,
        oauth={"clients": {"ci-agent": {"jwks_uri": "http://127.0.0.1:9/jwks"}}},
    )
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "triage",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"]},
    }
    task = api_for(app)("POST", "/api/v1/requests", body).json
    response = exchange(app, task, good(app))
    assert (response.status_code, response.json["error"]) == (401, "invalid_client")
    assert "jwks_uri" in response.json["error_description"]
