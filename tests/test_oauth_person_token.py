"""The person's own access token as the subject token (issue 12, item 3; RFC 8693 delegation):
real tokens from the OIDC provider for the people and the agents, tasks started through the API.
The broker finds the person's active task for the agent that holds the tool and scopes, and only
that: never another person's, another agent's, a pending or closed one; an agent's token is no
person's. Of several, the one whose window ends last."""

from __future__ import annotations

import jwt
import pytest

from broker.models import parse_time
from scripts.launchers import agent_secret, client_credentials_token
from tests.helpers import EXPIRING_AGENT, TASK_GITHUB, TASK_TOOLS, grants_of

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
POLICY = (
    TASK_TOOLS
    + f"""
[entitlements.triage]
backend = "tool_task"
max_duration = "1h"
[entitlements.triage.requesters]
groups = ["engineers"]
[entitlements.triage.task]
agents = ["ci-agent", "{EXPIRING_AGENT}"]
tools = {{ github = ["issues:read", "issues:write"], wiki = ["pages:read"] }}

[entitlements.triage-approved]
backend = "tool_task"
max_duration = "1h"
[entitlements.triage-approved.requesters]
groups = ["engineers"]
[entitlements.triage-approved.approval]
required = 1
from_groups = ["security"]
expires_after = "1h"
[entitlements.triage-approved.task]
agents = ["ci-agent"]
tools = {{ github = ["issues:read"] }}
"""
)


@pytest.fixture
def app(make_app):
    return make_app(policy_text=POLICY)


@pytest.fixture
def agent_token(oidc_provider, oidc_client_secret):
    return client_credentials_token(oidc_provider, "ci-agent", agent_secret(oidc_client_secret))


def start(app, api_for, user="alice", agent="ci-agent", scopes=("issues:read",), **changes):
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "triage the new issues",
        "agent": agent,
        "tools": {"github": list(scopes)},
        **changes,
    }
    response = api_for(app)("POST", "/api/v1/requests", body, user=user)
    assert response.status_code == 201, response.json
    return response.json


def exchange(app, subject_token, actor_token, scope="issues:read"):
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS,
        "actor_token": actor_token,
        "actor_token_type": ACCESS,
        "resource": TASK_GITHUB,
        "scope": scope,
    }
    return app.test_client().post("/oauth/token", data=form)


def recorded(app) -> list[dict]:
    rows = grants_of(app).store.db.execute("SELECT * FROM access_tokens").fetchall()
    return [dict(row) for row in rows]


def refused(response, app) -> None:
    """invalid_grant, no token, nothing recorded."""
    assert (response.status_code, response.json["error"]) == (400, "invalid_grant"), response.json
    assert "access_token" not in response.json
    assert recorded(app) == []


def test_a_persons_token_exchanges_for_their_task(app, api_for, tokens, agent_token):
    task = start(app, api_for)
    response = exchange(app, tokens("alice"), agent_token)
    assert response.status_code == 200, response.json
    claims = jwt.decode(response.json["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "ci-agent"}
    assert claims["aud"] == TASK_GITHUB and claims["scope"] == "issues:read"
    window_end = parse_time(grants_of(app).store.get_grant(task["id"]).window_end)
    assert claims["exp"] <= int(window_end.timestamp())
    (row,) = recorded(app)
    assert row["grant_id"] == task["id"]
    entry = grants_of(app).chain(task["id"])[-1]
    assert entry["type"] == "token_issued" and entry["data"]["sub"] == "alice"
    assert entry["data"]["agent"] == "ci-agent"
    assert entry["data"]["named_by"] == "person_token"  # the person's token named the task


def test_another_persons_task_is_not_reachable(app, api_for, tokens, agent_token):
    bobs = start(app, api_for, user="bob")
    refused(exchange(app, tokens("alice"), agent_token), app)
    # Bob's own token reaches it: the task was there, only not alice's.
    response = exchange(app, tokens("bob"), agent_token)
    assert response.status_code == 200, response.json
    assert recorded(app)[0]["grant_id"] == bobs["id"]


def test_a_task_of_another_agent_is_not_reachable(
    app, api_for, tokens, agent_token, oidc_provider, oidc_client_secret
):
    theirs = start(app, api_for, agent=EXPIRING_AGENT)
    refused(exchange(app, tokens("alice"), agent_token), app)
    # The agent the task is for reaches it with the same person token (its own provider token
    # lives two seconds: taken right before use).
    other = client_credentials_token(oidc_provider, EXPIRING_AGENT, oidc_client_secret)
    response = exchange(app, tokens("alice"), other)
    assert response.status_code == 200, response.json
    assert recorded(app)[0]["grant_id"] == theirs["id"]


def test_a_pending_task_is_not_reachable(app, api_for, tokens, agent_token):
    pending = start(app, api_for, entitlement="triage-approved")
    assert pending["status"] == "pending"
    refused(exchange(app, tokens("alice"), agent_token), app)


def test_a_released_task_is_not_reachable(app, api_for, tokens, agent_token):
    task = start(app, api_for)
    assert exchange(app, tokens("alice"), agent_token).status_code == 200
    released = api_for(app)("POST", f"/api/v1/requests/{task['id']}/release")
    assert released.status_code == 200, released.json
    before = len(recorded(app))
    response = exchange(app, tokens("alice"), agent_token)
    assert (response.status_code, response.json["error"]) == (400, "invalid_grant")
    assert len(recorded(app)) == before


def test_a_task_without_the_scope_is_not_reachable(app, api_for, tokens, agent_token):
    start(app, api_for, scopes=("issues:read",))
    refused(exchange(app, tokens("alice"), agent_token, scope="issues:write"), app)


def test_an_agents_token_is_no_persons(
    app, api_for, tokens, agent_token, oidc_provider, oidc_client_secret
):
    """Its own client-credentials token, another agent's, or junk: refused as subject tokens."""
    start(app, api_for)
    refused(exchange(app, agent_token, agent_token), app)
    other = client_credentials_token(oidc_provider, EXPIRING_AGENT, oidc_client_secret)
    refused(exchange(app, other, agent_token), app)
    for junk in ("not-a-jwt", tokens("alice")[:-4] + "AAAA", "é"):
        refused(exchange(app, junk, agent_token), app)


def test_of_several_tasks_the_one_whose_window_ends_last(app, api_for, tokens, agent_token):
    """Documented rule (README): of the person's tasks for this agent holding the tool and every
    scope asked, the one whose window ends last."""
    short = start(app, api_for, duration="10m")
    longest = start(app, api_for, duration="30m")
    writer = start(app, api_for, duration="5m", scopes=("issues:read", "issues:write"))
    for expected, scope in ((longest, "issues:read"), (writer, "issues:write")):
        response = exchange(app, tokens("alice"), agent_token, scope=scope)
        assert response.status_code == 200, response.json
        assert recorded(app)[-1]["grant_id"] == expected["id"], scope
    # Once the longest is released, the next to end last.
    api_for(app)("POST", f"/api/v1/requests/{longest['id']}/release")
    assert exchange(app, tokens("alice"), agent_token).status_code == 200
    assert recorded(app)[-1]["grant_id"] == short["id"]
