"""Token exchange for agents (issue 12, items 3, 5 and 7): the real ci-agent token from the OIDC
provider as actor_token, a task started by a person through the API, the token verified by
broker.toolauth against the served JWKS, introspection and revocation."""

from __future__ import annotations

import jwt
import pytest

from broker.backends.tool_task import SUBJECT_TOKEN_TYPE
from broker.errors import InvalidToken
from broker.toolauth import ToolTokenVerifier
from scripts.launchers import TOOL_CLIENT_ID, agent_secret, client_credentials_token, tool_secret
from tests.helpers import grants_of

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
GITHUB = "https://tools.internal/github"
WIKI = "http://127.0.0.1:9/wiki"
POLICY = f"""
[tools.github]
resource = "{GITHUB}"
scopes = ["issues:read", "issues:write"]
introspection_client = "github-tool"

[tools.wiki]
resource = "{WIKI}"
scopes = ["pages:read"]
max_token_lifetime = "2m"

[entitlements.triage]
backend = "tool_task"
max_duration = "1h"
[entitlements.triage.requesters]
groups = ["engineers"]
[entitlements.triage.task]
agents = ["ci-agent"]
tools = {{ github = ["issues:read", "issues:write"], wiki = ["pages:read"] }}
"""


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
        ({"subject_token_type": ACCESS}, 400, "invalid_request"),
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
