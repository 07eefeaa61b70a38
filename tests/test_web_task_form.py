"""Task grants in the browser (issue 12, item 2 "in the UI too"): a person logged in through the
real provider starts a task for an agent on the request form, sees the subject token once with the
token exchange an agent makes, and the grant page shows the task; a choice the policy does not
allow is refused with its message and nothing is recorded."""

from __future__ import annotations

import html
import re

import pytest

from broker.backends.tool_task import SUBJECT_TOKEN_TYPE, subject_token_handle
from tests.helpers import browser, csrf, grants_of, page

POLICY = """
[tools.github]
resource = "https://tools.internal/github"
scopes = ["issues:read", "issues:write", "issues:admin"]

[tools.wiki]
resource = "https://tools.internal/wiki"
scopes = ["pages:read"]

[entitlements.triage]
description = "An agent triages issues for a person"
backend = "tool_task"
max_duration = "1h"

[entitlements.triage.requesters]
groups = ["engineers"]

[entitlements.triage.task]
agents = ["ci-agent"]
tools = { github = ["issues:read", "issues:write"], wiki = ["pages:read"] }

[entitlements.kv-read]
description = "Read the test secrets"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]

[entitlements.kv-read.reason]
min_length = 1
"""

SECRET = re.compile(r'<p class="secret" id="credential">([^<]+)</p>')
GRANT_ID = re.compile(r'action="/requests/([^/"]+)/release"')


@pytest.fixture
def app(make_app):
    return make_app(policy_text=POLICY)


def count(app, table="grants"):
    return grants_of(app).store.db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]  # noqa: S608


def post(client, home, **fields):
    """The form posted; the answer followed (a credential comes by POST-redirect-GET)."""
    data = {"csrf_token": csrf(home), "duration": "10m", "reason": "triage the new issues"}
    data.update(fields)
    return client.post("/requests", data=data, follow_redirects=True)


FORM = "/request?entitlement=triage"  # the request page of the task entitlement


def test_the_form_offers_the_agents_and_the_scopes_the_policy_allows(app):
    home = page(browser(app, "alice"), FORM)
    assert 'name="agent"' in home
    assert 'value="ci-agent"' in home
    for tool, scope in [
        ("github", "issues:read"),
        ("github", "issues:write"),
        ("wiki", "pages:read"),
    ]:
        assert f'name="tool:{tool}" value="{scope}"' in home
    assert "issues:admin" not in home  # the tool knows it, the entitlement does not give it


def test_a_person_starts_a_task_sees_the_subject_token_once_and_the_grant_shows_it(app):
    client = browser(app, "alice")
    home = page(client, "/")
    answer = post(
        client,
        home,
        entitlement="triage",
        agent="ci-agent",
        **{"tool:github": ["issues:read", "issues:write"], "tool:wiki": "pages:read"},
    )
    text = answer.get_data(as_text=True)
    assert answer.status_code == 200, text
    assert answer.headers["Cache-Control"] == "no-store"
    token = SECRET.search(text).group(1)
    grant_id = GRANT_ID.search(text).group(1)
    grant = grants_of(app).store.get_grant(grant_id)
    assert grant.status == "active"
    assert grant.handle == subject_token_handle(token)
    assert grant.task.tools_json() == {
        "github": ["issues:read", "issues:write"],
        "wiki": ["pages:read"],
    }
    # How the agent uses it: a ready token exchange per tool, placeholders for the two tokens.
    shown = html.unescape(text)
    assert "/oauth/token" in shown
    assert "grant_type=urn:ietf:params:oauth:grant-type:token-exchange" in shown
    assert f"subject_token_type={SUBJECT_TOKEN_TYPE}" in shown
    assert "actor_token_type=urn:ietf:params:oauth:token-type:access_token" in shown
    assert "resource=https://tools.internal/github" in shown
    assert "scope=issues:read issues:write" in shown
    assert "resource=https://tools.internal/wiki" in shown
    assert shown.count(token) == 1  # the curl names placeholders, not the token again

    detail = page(client, f"/requests/{grant_id}")
    assert token not in detail and token not in page(client, "/")  # shown once
    assert 'id="task-agent">ci-agent<' in detail
    assert "github: issues:read, issues:write; wiki: pages:read" in detail
    assert 'id="task-started-by">alice@example.com<' in detail
    assert 'id="task-on-behalf-of">alice@example.com<' in detail


def test_a_scope_the_policy_does_not_allow_is_refused_with_its_message_and_nothing_recorded(app):
    client = browser(app, "alice")
    home = page(client, "/")
    grants, entries = count(app), count(app, "audit")
    answer = post(
        client, home, entitlement="triage", agent="ci-agent", **{"tool:github": "issues:admin"}
    )
    text = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == 403, text
    assert "triage allows github the scopes issues:read, issues:write; not issues:admin" in text
    assert (count(app), count(app, "audit")) == (grants, entries)


@pytest.mark.parametrize(
    "fields, status, says",
    [
        ({"agent": "other-agent", "tool:github": "issues:read"}, 403, "not for other-agent"),
        ({"agent": "ci-agent"}, 400, "tools must be"),
        ({"tool:github": "issues:read"}, 400, "agent must be"),
        ({}, 400, "triage is a task: name the agent (ci-agent) and the tools"),
        ({"agent": "ci-agent", "tool:nope": "x"}, 404, "no tool named 'nope'"),
        ({"agent": "ci-agent", "tool:" + "g" * 500: "x"}, 400, "must be a list of scopes"),
    ],
)
def test_a_bad_task_choice_is_a_4xx_and_records_nothing(app, fields, status, says):
    client = browser(app, "alice")
    home = page(client, "/")
    grants = count(app)
    answer = post(client, home, entitlement="triage", **fields)
    text = html.unescape(answer.get_data(as_text=True))
    assert answer.status_code == status, text
    assert says in text
    assert count(app) == grants


def test_a_refused_form_keeps_the_task_choices(app):
    client = browser(app, "alice")
    home = page(client, "/")
    answer = post(
        client,
        home,
        entitlement="triage",
        duration="3h",
        agent="ci-agent",
        **{"tool:wiki": "pages:read"},
    )
    text = answer.get_data(as_text=True)
    assert answer.status_code == 422, text
    assert 'name="tool:wiki" value="pages:read" checked' in text
    assert 'name="tool:github" value="issues:read" checked' not in text
    assert '<option value="ci-agent" selected' in text


def test_task_fields_do_not_change_a_credential_request(app, openbao):
    client = browser(app, "alice")
    home = page(client, "/")
    answer = post(
        client, home, entitlement="kv-read", agent="ci-agent", **{"tool:github": "issues:read"}
    )
    text = answer.get_data(as_text=True)
    assert answer.status_code == 200, text
    grant = grants_of(app).store.get_grant(GRANT_ID.search(text).group(1))
    assert grant.task is None and grant.backend == "vault_token"
    assert "Vault token" in text and "/oauth/token" not in text


def test_the_task_form_needs_its_csrf_token(app):
    client = browser(app, "alice")
    grants = count(app)
    answer = client.post(
        "/requests",
        data={"entitlement": "triage", "agent": "ci-agent", "tool:github": "issues:read"},
    )
    assert answer.status_code == 400
    assert count(app) == grants


def test_a_person_with_no_task_entitlement_sees_no_task_fields(make_app):
    app = make_app(policy_text=POLICY[POLICY.index("[entitlements.kv-read]") :])
    home = page(browser(app, "alice"), "/request?entitlement=kv-read")
    assert "kv-read" in home and 'name="agent"' not in home
