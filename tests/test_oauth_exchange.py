"""Token exchange for agents (issue 12, items 3, 5 and 7): the real ci-agent token from the OIDC
provider as actor_token, a task started by a person through the API, the token verified by
broker.toolauth against the served JWKS, introspection and revocation."""

from __future__ import annotations

import threading
from datetime import timedelta

import jwt
import pytest

from broker.backends.tool_task import SUBJECT_TOKEN_TYPE
from broker.errors import InvalidToken
from broker.models import parse_time
from broker.toolauth import ToolTokenVerifier
from scripts.launchers import TOOL_CLIENT_ID, agent_secret, client_credentials_token, tool_secret
from tests.helpers import EXPIRING_AGENT, TASK_GITHUB, TASK_TOOLS, TASK_WIKI, TRIAGE_TASK, grants_of

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
GITHUB, WIKI = TASK_GITHUB, TASK_WIKI
POLICY = TASK_TOOLS + TRIAGE_TASK


@pytest.fixture
def app(make_app):
    return make_app(policy_text=POLICY)


@pytest.fixture
def agent_token(oidc_provider, oidc_client_secret):
    return client_credentials_token(oidc_provider, "ci-agent", agent_secret(oidc_client_secret))


@pytest.fixture
def tool_token(oidc_provider, oidc_client_secret):
    return client_credentials_token(oidc_provider, TOOL_CLIENT_ID, tool_secret(oidc_client_secret))


@pytest.fixture
def task(app, api_for):
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "triage the new issues",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read", "issues:write"], "wiki": ["pages:read"]},
    }
    response = api_for(app)("POST", "/api/v1/requests", body)
    assert response.status_code == 201, response.json
    return response.json


def exchange(app, agent_token, task, **changes):
    form = {
        "grant_type": EXCHANGE,
        "subject_token": task["credential"]["subject_token"],
        "subject_token_type": SUBJECT_TOKEN_TYPE,
        "actor_token": agent_token,
        "actor_token_type": ACCESS,
        "resource": GITHUB,
        "scope": "issues:read",
    }
    form.update(changes)
    form = {k: v for k, v in form.items() if v is not None}
    return app.test_client().post("/oauth/token", data=form)


def verifier_for(app, resource, keys_from):
    issuer = app.extensions["jit"].signer.issuer

    class Keys:  # the served JWKS, through the app itself
        def get(self, kid):
            document = keys_from.get("/.well-known/jwks.json").json
            found = {k["kid"]: jwt.PyJWK(k) for k in document["keys"]}
            return found.get(kid)

    return ToolTokenVerifier(issuer, "", resource, keys=Keys())  # type: ignore[arg-type]


def test_an_agent_exchanges_its_task_for_a_tool_token(app, agent_token, task):
    response = exchange(app, agent_token, task)
    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body["issued_token_type"] == ACCESS and body["token_type"] == "Bearer"
    assert body["scope"] == "issues:read" and "refresh_token" not in body
    verified = verifier_for(app, GITHUB, app.test_client()).verify(body["access_token"])
    assert verified.subject == "alice" and verified.actor == "ci-agent"
    assert verified.client_id == "ci-agent" and verified.scopes == {"issues:read"}
    claims = verified.claims
    assert claims["aud"] == GITHUB and claims["act"] == {"sub": "ci-agent"}
    assert claims["exp"] - claims["iat"] == body["expires_in"] <= 300
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
    entry = grants_of(app).chain(task["id"])[-1]
    assert entry["type"] == "token_issued"
    assert entry["data"]["tool"] == "github" and entry["data"]["scopes"] == ["issues:read"]
    assert entry["data"]["exp"] == claims["exp"] and claims["jti"] not in str(entry)
    assert entry["data"]["named_by"] == "task_token"
    # A token for github is refused by the wiki's verifier.
    with pytest.raises(InvalidToken):
        verifier_for(app, WIKI, app.test_client()).verify(body["access_token"])


def test_default_scope_is_all_granted_and_exp_within_the_tool_lifetime(app, agent_token, task):
    body = exchange(app, agent_token, task, scope=None, resource=WIKI).json
    assert body["scope"] == "pages:read" and body["expires_in"] <= 120


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"actor_token": None}, 401, "invalid_client"),
        ({"actor_token": "not-a-jwt"}, 401, "invalid_client"),
        ({"actor_token_type": "urn:x"}, 400, "invalid_request"),
        ({"subject_token": "unknown"}, 400, "invalid_grant"),
        ({"subject_token_type": "urn:x"}, 400, "invalid_request"),
        # An access_token subject is the person's own token: the task's is none.
        ({"subject_token_type": ACCESS}, 400, "invalid_grant"),
        ({"resource": "https://tools.internal/other"}, 400, "invalid_target"),
        ({"resource": None}, 400, "invalid_target"),
        ({"scope": "issues:admin"}, 400, "invalid_scope"),
        ({"grant_type": "refresh_token"}, 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
    ],
)
def test_bad_exchanges_get_an_oauth_error_and_no_chain_entry(
    app, agent_token, task, changes, status, error
):
    before = len(grants_of(app).chain(task["id"]))
    response = exchange(app, agent_token, task, **changes)
    assert (response.status_code, response.json["error"]) == (status, error), response.json
    assert len(grants_of(app).chain(task["id"])) == before


def test_a_person_token_is_no_actor(app, task, tokens):
    response = exchange(app, tokens("alice"), task)
    assert (response.status_code, response.json["error"]) == (401, "invalid_client")


def test_introspection_goes_inactive_at_release(app, agent_token, tool_token, task, api_for):
    token = exchange(app, agent_token, task).json["access_token"]
    client = app.test_client()

    def introspect(bearer=tool_token):
        headers = {"Authorization": f"Bearer {bearer}"}
        return client.post("/oauth/introspect", data={"token": token}, headers=headers)

    answer = introspect()
    assert answer.status_code == 200 and answer.json["active"] is True, answer.json
    assert answer.json["act"] == {"sub": "ci-agent"} and answer.json["aud"] == GITHUB
    assert introspect(agent_token).json == {"active": False}  # not the github tool's client
    assert introspect("nope").status_code == 401
    released = api_for(app)("POST", f"/api/v1/requests/{task['id']}/release")
    assert released.status_code == 200
    assert introspect().json == {"active": False}


def test_the_agent_revokes_its_token(app, agent_token, tool_token, task):
    token = exchange(app, agent_token, task).json["access_token"]
    client = app.test_client()
    form = {"token": token, "actor_token": agent_token, "actor_token_type": ACCESS}
    assert client.post("/oauth/revoke", data=form).status_code == 200
    assert grants_of(app).chain(task["id"])[-1]["type"] == "token_revoked"
    headers = {"Authorization": f"Bearer {tool_token}"}
    answer = client.post("/oauth/introspect", data={"token": token}, headers=headers)
    assert answer.json == {"active": False}
    # Again: 200, nothing more recorded.
    before = len(grants_of(app).chain(task["id"]))
    assert client.post("/oauth/revoke", data=form).status_code == 200
    assert len(grants_of(app).chain(task["id"])) == before


def other_agent_token(oidc_provider, oidc_client_secret):
    """expiring-agent: a second real agent client of the provider (its tokens live two seconds,
    so take one right before use)."""
    return client_credentials_token(oidc_provider, EXPIRING_AGENT, oidc_client_secret)


def introspect(app, tool_token, token):
    headers = {"Authorization": f"Bearer {tool_token}"}
    return app.test_client().post("/oauth/introspect", data={"token": token}, headers=headers)


def recorded_tokens(app, grant_id):
    store = grants_of(app).store
    rows = store.db.execute("SELECT * FROM access_tokens WHERE grant_id = ?", [grant_id])
    return [dict(row) for row in rows.fetchall()]


@pytest.mark.parametrize(
    "token",
    ["theirs", "not-a-jwt", "", jwt.encode({"jti": "x"}, "k" * 32, algorithm="HS256")],
)
def test_revoking_a_token_not_the_agents_answers_200_and_revokes_nothing(
    app, agent_token, tool_token, task, oidc_provider, oidc_client_secret, token
):
    """RFC 7009 §2.2: another agent's, an unknown or a malformed token: 200, nothing revoked,
    nothing recorded."""
    issued = exchange(app, agent_token, task).json["access_token"]
    token = issued if token == "theirs" else token
    before = len(grants_of(app).chain(task["id"]))
    other = other_agent_token(oidc_provider, oidc_client_secret)
    form = {"token": token, "actor_token": other, "actor_token_type": ACCESS}
    response = app.test_client().post("/oauth/revoke", data=form)
    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    assert len(grants_of(app).chain(task["id"])) == before
    assert introspect(app, tool_token, issued).json["active"] is True
    assert [row["revoked_at"] for row in recorded_tokens(app, task["id"])] == [""]


def test_revocation_still_needs_the_token_parameter(app, agent_token):
    form = {"actor_token": agent_token, "actor_token_type": ACCESS}
    response = app.test_client().post("/oauth/revoke", data=form)
    assert (response.status_code, response.json["error"]) == (400, "invalid_request")


def test_another_agent_cannot_exchange_the_task(app, task, oidc_provider, oidc_client_secret):
    """RFC 8693 §2.2.2: a subject token naming another agent's task is invalid_grant; no token,
    no record, no chain entry."""
    before = len(grants_of(app).chain(task["id"]))
    response = exchange(app, other_agent_token(oidc_provider, oidc_client_secret), task)
    assert (response.status_code, response.json["error"]) == (400, "invalid_grant"), response.json
    assert "access_token" not in response.json
    assert response.headers["Cache-Control"] == "no-store"
    assert len(grants_of(app).chain(task["id"])) == before
    assert recorded_tokens(app, task["id"]) == []


def test_exp_is_the_window_end_when_the_window_ends_first(app, api_for, agent_token):
    """github's tokens live 5 minutes; a 2 minute task: exp is its window end, to the second."""
    body = {
        "entitlement": "triage",
        "duration": "2m",
        "reason": "a short triage",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"]},
    }
    task = api_for(app)("POST", "/api/v1/requests", body).json
    window_end = parse_time(grants_of(app).store.get_grant(task["id"]).window_end)
    response = exchange(app, agent_token, task)
    assert response.status_code == 200, response.json
    claims = jwt.decode(response.json["access_token"], options={"verify_signature": False})
    assert claims["exp"] == int(window_end.timestamp())
    assert claims["exp"] - claims["iat"] == response.json["expires_in"] < 300
    assert recorded_tokens(app, task["id"])[0]["exp"] == claims["exp"]
    assert grants_of(app).chain(task["id"])[-1]["data"]["exp"] == claims["exp"]
    # Later still, with the window end nearer: never past it.
    later = grants_of(app).clock() + timedelta(seconds=90)
    grants_of(app).clock = lambda: later
    again = exchange(app, agent_token, task).json["access_token"]
    assert jwt.decode(again, options={"verify_signature": False})["exp"] == claims["exp"]


def test_exchanges_racing_the_release(app, api_for, agent_token, tool_token, task):
    """Many agents' requests while the person releases: each gets a token that introspection calls
    inactive after the release, or a clean invalid_grant; none is recorded after the release."""
    threads_n = 16
    barrier = threading.Barrier(threads_n + 1)
    answers: list = []
    released: list = []
    some_issued, release_done = threading.Event(), threading.Event()

    def exchanger():
        barrier.wait()
        for _ in range(4):
            response = exchange(app, agent_token, task)
            answers.append((response.status_code, response.json))
            if sum(status == 200 for status, _ in answers) >= threads_n // 2:
                some_issued.set()
        release_done.wait(timeout=60)  # and once more when it is surely released
        response = exchange(app, agent_token, task)
        answers.append((response.status_code, response.json))

    def releaser():
        barrier.wait()
        some_issued.wait(timeout=60)  # release while exchanges are in flight, not before them
        released.append(api_for(app)("POST", f"/api/v1/requests/{task['id']}/release"))
        release_done.set()

    workers = [threading.Thread(target=exchanger) for _ in range(threads_n)]
    workers.append(threading.Thread(target=releaser))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert released[0].status_code == 200, released[0].json
    tokens = []
    for status, body in answers:
        assert status in (200, 400), body
        if status == 400:
            assert body["error"] == "invalid_grant", body
        else:
            tokens.append(body["access_token"])
    assert len(answers) == 5 * threads_n
    assert 0 < len(tokens) < len(answers)  # both sides of the race were seen
    for token in tokens:
        assert introspect(app, tool_token, token).json == {"active": False}
    chain = grants_of(app).chain(task["id"])
    types = [entry["type"] for entry in chain]
    release_at = types.index("release")
    assert "token_issued" not in types[release_at:]
    assert types.count("token_issued") == len(tokens) == len(recorded_tokens(app, task["id"]))
    # No token recorded after the release: every issue's entry precedes it in the chain.
    issued = [entry["seq"] for entry in chain if entry["type"] == "token_issued"]
    assert all(seq < chain[release_at]["seq"] for seq in issued)
