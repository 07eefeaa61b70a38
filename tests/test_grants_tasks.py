"""Task grants for agents (issue 12, items 1, 2 and the grant side of 7): tools in the policy,
tasks started through the API by a person or by the agent itself (a real client-credentials
token), the subject token the token endpoint will take, and the window closing for agents."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.backends import POLICY_KINDS
from broker.backends.tool_task import ToolTaskBackend
from broker.errors import TaskNotActive, UnknownTask
from broker.models import parse_time, utcnow
from broker.policy import check_policy_text
from scripts.launchers import agent_secret, client_credentials_token
from tests.helpers import TASK_TOOLS, TRIAGE_TASK, grants_of, types

TASK_POLICY = (
    TASK_TOOLS
    + TRIAGE_TASK
    + """
[entitlements.ci-triage]
description = "CI starts its own triage"
backend = "tool_task"
max_duration = "30m"

[entitlements.ci-triage.task]
agents = ["ci-agent"]
agent_may_start = true
tools = { github = ["issues:read"] }

[entitlements.kv-read]
description = "Read the test secrets"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]
"""
)


@pytest.fixture
def app(make_app):
    return make_app(policy_text=TASK_POLICY)


@pytest.fixture
def api(app, api_for):
    return api_for(app)


@pytest.fixture
def agent_token(oidc_provider, oidc_client_secret):
    return client_credentials_token(
        oidc_provider, "ci-agent", agent_secret(oidc_client_secret), oidc_provider.api_resource
    )


def start(api, tools=None, entitlement="triage", agent="ci-agent", duration="10m", user="alice"):
    body = {
        "entitlement": entitlement,
        "duration": duration,
        "reason": "triage the new issues",
        "agent": agent,
        "tools": tools if tools is not None else {"github": ["issues:read"]},
    }
    return api("POST", "/api/v1/requests", body, user=user)


def problems(text: str) -> list[str]:
    policy, found = check_policy_text(text, POLICY_KINDS)
    assert policy is None
    return [f"{p.line}: {p.message}" for p in found]


# --- the policy -----------------------------------------------------------------------------------


def test_tools_and_task_rules_are_read():
    policy, found = check_policy_text(TASK_POLICY, POLICY_KINDS)
    assert found == [] and policy is not None
    assert policy.tools["github"].resource == "https://tools.internal/github"
    assert policy.tools["github"].max_token_lifetime == 300  # the default 5m
    assert policy.tools["wiki"].max_token_lifetime == 120
    rule = policy.entitlements["ci-triage"].task
    assert rule is not None and rule.agent_may_start and rule.agents == ("ci-agent",)
    assert rule.allowed_scopes("github") == ("issues:read",)


def test_each_tool_problem_names_its_line():
    text = """[tools.github]
resource = "http://tools.internal/github"
scopes = ["issues:read", "bad scope"]
max_token_lifetime = "2h"

[tools.nowhere]
scopes = ["x"]

[entitlements.triage]
backend = "tool_task"
max_duration = "1h"

[entitlements.triage.requesters]
groups = ["engineers"]
agents = ["ci-agent"]

[entitlements.triage.task]
agents = ["ci-agent"]
tools = { github = ["issues:write"], jira = ["read"] }

[entitlements.plain]
vault_policies = ["p"]
max_duration = "1h"
[entitlements.plain.requesters]
groups = ["engineers"]
[entitlements.plain.task]
agents = ["ci-agent"]
"""
    found = problems(text)
    assert any(p.startswith("2: ") and "https://" in p for p in found), found
    assert any(p.startswith("3: ") and "'bad scope'" in p for p in found), found
    assert any(p.startswith("4: ") and "short-lived" in p for p in found), found
    assert any(p.startswith("6: ") and "resource is missing" in p for p in found), found
    assert any(p.startswith("15: ") and "task.agents" in p for p in found), found
    assert any(p.startswith("19: ") and "unknown tool 'jira'" in p for p in found), found
    assert any("does not declare scope issues:write" in p for p in found), found
    assert any(p.startswith("26: ") and 'needs backend = "tool_task"' in p for p in found), found


def test_a_task_entitlement_needs_its_task_table():
    text = TASK_TOOLS + '[entitlements.t]\nbackend = "tool_task"\nmax_duration = "1h"\n'
    text += '[entitlements.t.requesters]\ngroups = ["e"]\n'
    assert any("needs [entitlements.t.task]" in p for p in problems(text))


# --- task grants through the API ------------------------------------------------------------------


def test_a_person_starts_a_task_for_an_agent_and_the_subject_token_names_it(api, app):
    response = start(api, {"github": ["issues:read"], "wiki": ["pages:read"]})
    assert response.status_code == 201, response.json
    body = response.json
    assert body["status"] == "active"
    assert body["task"] == {
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"], "wiki": ["pages:read"]},
        "started_by": "person",
        "on_behalf_of": body["requester"],
    }
    credential = body["credential"]
    assert credential["type"] == "tool_task"
    assert credential["subject_token_type"] == "urn:jit-broker:params:oauth:token-type:task"
    grants = grants_of(app)
    grant, scope = grants.task_for_subject_token(credential["subject_token"])
    assert grant.id == body["id"] and scope.agent == "ci-agent"
    assert scope.on_behalf_of == {
        "iss": grant.requester_iss,
        "sub": "alice",
        "display": grant.requester,
    }
    assert scope.window_end == parse_time(body["window"]["end"])
    tool, scopes = scope.tool_for("https://tools.internal/github")
    assert (tool.name, scopes, tool.max_token_lifetime) == ("github", ("issues:read",), 300)
    assert scope.tool_for("https://tools.internal/other") is None
    # The chain says who started it, for which agent, on whose behalf; never the token.
    request, decision = grants.chain(body["id"])[:2]
    assert request["data"]["task"] == {
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"], "wiki": ["pages:read"]},
        "started_by": "person",
        "on_behalf_of": {"iss": grant.requester_iss, "sub": "alice"},
    }
    assert decision["data"]["task"] == request["data"]["task"]
    assert credential["subject_token"] not in str(grants.chain(body["id"]))
    assert grant.handle not in str(grants.chain(body["id"]))  # only its HMAC


def test_released_task_is_refused_and_reaped(api, app):
    body = start(api).json
    grants = grants_of(app)
    token = body["credential"]["subject_token"]
    assert api("POST", f"/api/v1/requests/{body['id']}/release").status_code == 200
    with pytest.raises(TaskNotActive) as refused:
        grants.task_for_subject_token(token)
    assert refused.value.status_of_task == "released"
    grants.reap_due()
    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert types(grants, body["id"])[-2:] == ["revoke", "verify"]


def test_the_reaper_closes_a_task_at_its_window_end(api, app):
    body = start(api, duration="1m").json
    grants = grants_of(app)
    end = parse_time(body["window"]["end"])
    grants.reap_due(end)
    assert grants.store.get_grant(body["id"]).status == "revoked"
    with pytest.raises(TaskNotActive):
        grants.task_for_subject_token(body["credential"]["subject_token"])


def test_unknown_subject_tokens_are_refused(app):
    grants = grants_of(app)
    for token in ("", "x" * 600, 42, "not-a-token"):
        with pytest.raises(UnknownTask):
            grants.task_for_subject_token(token)


def test_an_agent_starts_its_own_task_only_where_the_policy_allows(app, agent_token):
    client = app.test_client()

    def api(method, path, body, user):
        headers = {"Authorization": f"Bearer {user}"}
        return client.open(path, method=method, json=body, headers=headers)

    own = start(api, entitlement="ci-triage", user=agent_token)
    assert own.status_code == 201, own.json
    assert own.json["task"]["started_by"] == "agent"
    assert own.json["task"]["on_behalf_of"] is None
    _, scope = grants_of(app).task_for_subject_token(own.json["credential"]["subject_token"])
    assert scope.on_behalf_of is None
    reserved = start(api, entitlement="triage", user=agent_token)
    assert (reserved.status_code, reserved.json["error"]) == (403, "agent_may_not_start")
    other = start(api, entitlement="ci-triage", agent="someone-else", user=agent_token)
    assert (other.status_code, other.json["error"]) == (403, "not_own_task")


@pytest.mark.parametrize(
    ("changes", "status", "error"),
    [
        ({"tools": {"jira": ["read"]}}, 404, "unknown_tool"),
        ({"tools": {"github": ["admin"]}}, 403, "scope_not_allowed"),
        ({"tools": {"github": ["issues:read"], "wiki": []}}, 400, "invalid_request"),
        ({"entitlement": "ci-triage"}, 403, "not_eligible"),  # no person may start it
        ({"agent": "rogue-agent"}, 403, "agent_not_allowed"),
        ({"entitlement": "kv-read"}, 400, "not_a_task"),
        ({"tools": {"github": "issues:read"}}, 400, "invalid_request"),
        ({"tools": []}, 400, "invalid_request"),
        ({"tools": {"github": []}}, 400, "invalid_request"),
        ({"agent": 7}, 400, "invalid_request"),
        ({"agent": None}, 400, "invalid_request"),
    ],
)
def test_bad_task_requests_are_refused_and_leave_no_trace(api, app, changes, status, error):
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "triage the new issues",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"]},
        **changes,
    }
    response = api("POST", "/api/v1/requests", body)
    assert (response.status_code, response.json["error"]) == (status, error), response.json
    assert list(grants_of(app).store.audit_entries()) == []


def test_a_task_entitlement_asked_without_a_task_is_refused(api, app):
    body = {"entitlement": "triage", "duration": "10m", "reason": "triage the new issues"}
    response = api("POST", "/api/v1/requests", body)
    assert (response.status_code, response.json["error"]) == (400, "task_required")


def test_a_subject_token_is_proven_gone_by_the_store_not_assumed(api, app):
    """The tool task kind's `is_gone` asks the store whether the broker would still honour the
    token: false while its grant is active, true once it has moved on; a backend that cannot ask
    proves nothing, so the grant stays revoke_failed rather than claim an unchecked removal."""
    body = start(api).json
    grants = grants_of(app)
    backend = grants.backends["tool_task"]
    handle = grants.store.get_grant(body["id"]).handle
    assert backend.is_gone(handle) is False  # active: still honoured

    blind = ToolTaskBackend()  # built without a way to ask the store
    grants.backends = {**grants.backends, "tool_task": blind}
    assert api("POST", f"/api/v1/requests/{body['id']}/release").status_code == 200
    grants.reap_due()
    assert grants.store.get_grant(body["id"]).status == "revoke_failed"

    grants.backends = {**grants.backends, "tool_task": backend}
    assert backend.is_gone(handle) is True
    grants.reap_due(utcnow() + timedelta(minutes=10))
    assert grants.store.get_grant(body["id"]).status == "revoked"
