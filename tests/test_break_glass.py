"""Break-glass end to end against real OpenBao and the real OIDC provider: issued at once past
approvals, ticket and schedule, loudly; refused to everyone else with nothing recorded; reviewed
once, never by the requester; overdue reviews on /readyz; the policy table checked; the UI."""

import re
from datetime import UTC, datetime, timedelta

import pytest

from broker.backends import POLICY_KINDS
from broker.models import parse_time
from broker.policy import check_policy_text
from scripts.launchers import client_credentials_token
from tests.helpers import browser, grants_of, page, token_works, types

OUT_OF_HOURS = datetime.now(UTC) + timedelta(hours=3)  # the schedule is closed now

BREAK_GLASS_POLICY = f"""
[entitlements.prod-fix]
description = "Fix production"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "2h"

[entitlements.prod-fix.requesters]
groups = ["engineers"]
agents = ["ci-agent"]

[entitlements.prod-fix.reason]
min_length = 5
ticket = "^INC-\\\\d+$"

[entitlements.prod-fix.schedule]
hours = "{OUT_OF_HOURS:%H}:00-{OUT_OF_HOURS + timedelta(hours=1):%H}:00"

[entitlements.prod-fix.approval]
required = 2
from_groups = ["security"]

[entitlements.prod-fix.break_glass]
groups = ["engineers"]
reviewers = ["security"]
max_duration = "30m"
review_within = "24h"

[entitlements.kv-read]
description = "Read the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]
"""

EMERGENCY = {
    "entitlement": "prod-fix",
    "duration": "20m",
    "reason": "database down, paging storm",
    "break_glass": True,
}


@pytest.fixture
def app(make_app):
    return make_app(policy_text=BREAK_GLASS_POLICY)


@pytest.fixture
def alerts(app):
    sent = []
    app.extensions["jit"].grants.notify = lambda event, text, **details: sent.append(
        (event, details["audience"], text)
    )
    return sent


def test_break_glass_issues_at_once_past_approval_ticket_and_schedule(
    app, api_for, alerts, openbao
):
    api = api_for(app)
    normal = api("POST", "/api/v1/requests", {**EMERGENCY, "break_glass": False, "ticket": "INC-1"})
    assert normal.status_code == 422 and normal.json["error"] == "outside_schedule", normal.json

    response = api("POST", "/api/v1/requests", EMERGENCY)

    assert response.status_code == 201, response.json
    body = response.json
    assert body["status"] == "active" and body["break_glass"] is True
    assert token_works(openbao, body["credential"]["token"])
    start, end = parse_time(body["window"]["start"]), parse_time(body["window"]["end"])
    assert end - start == timedelta(minutes=20)  # no schedule cut
    assert parse_time(body["review"]["due"]) - start == timedelta(days=1)
    assert body["review"]["at"] is None
    assert types(grants_of(app), body["id"]) == ["request", "decision", "break_glass", "issue"]
    chain = app.extensions["jit"].grants.chain(body["id"])
    assert chain[0]["data"]["break_glass"] is True
    assert any("bypassed" in reason for reason in chain[1]["data"]["reasons"])
    assert chain[2]["data"]["reviewers"] == ["security"] and chain[2]["data"]["reason"]
    ((event, audience, text),) = alerts
    assert (event, audience) == ("break_glass", "security")
    assert "BREAK-GLASS" in text and body["id"] in text


@pytest.mark.parametrize(
    ("user", "change", "status", "code"),
    [
        ("carol", {}, 403, "not_eligible"),
        ("alice", {"duration": "45m"}, 422, "duration_too_long"),
        ("alice", {"reason": "help"}, 422, "reason_too_short"),
        ("alice", {"break_glass": "yes"}, 400, "invalid_request"),
        ("alice", {"entitlement": "kv-read"}, 403, "no_break_glass"),
        ("alice", {"entitlement": "nope"}, 404, "unknown_entitlement"),
    ],
)
def test_break_glass_refusals_say_why_and_record_nothing(app, api_for, alerts, user, change,
                                                         status, code):  # fmt: skip
    response = api_for(app)("POST", "/api/v1/requests", {**EMERGENCY, **change}, user)
    assert (response.status_code, response.json["error"]) == (status, code), response.json
    assert response.json["detail"]
    store = app.extensions["jit"].grants.store
    assert list(store.audit_entries()) == [] and alerts == []


def test_an_agent_cannot_break_glass(app, oidc_provider, oidc_client_secret):
    token = client_credentials_token(oidc_provider, "ci-agent", f"{oidc_client_secret}-agent")
    response = app.test_client().post(
        "/api/v1/requests", json=EMERGENCY, headers={"Authorization": f"Bearer {token}"}
    )
    assert (response.status_code, response.json["error"]) == (403, "not_eligible")
    assert "never for agents" in response.json["detail"]


def review(api, grant_id, user, outcome="justified", notes="real outage, INC-9 opened after"):
    body = {"outcome": outcome, "notes": notes}
    return api("POST", f"/api/v1/requests/{grant_id}/review", body, user)


def test_a_review_is_recorded_once_and_never_by_the_requester(app, api_for, alerts):
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", EMERGENCY).json["id"]
    assert api("GET", f"/api/v1/requests/{grant_id}", user="dave").status_code == 200  # reviewer

    assert review(api, grant_id, "alice").json["error"] == "self_review"
    assert review(api, grant_id, "carol").json["error"] == "not_a_reviewer"
    assert review(api, grant_id, "dave", outcome="fine").status_code == 400
    assert review(api, grant_id, "dave", notes="  ").status_code == 400
    reviewed = review(api, grant_id, "dave")
    assert reviewed.status_code == 200, reviewed.json
    assert reviewed.json["review"]["by"] == "dave@example.com" and reviewed.json["review"]["at"]
    again = review(api, grant_id, "frank")  # an auditor may review, but only once per grant
    assert (again.status_code, again.json["error"]) == (409, "already_reviewed")

    entry = app.extensions["jit"].grants.chain(grant_id)[-1]
    assert entry["type"] == "review" and entry["actor"]["sub"] == "dave"
    assert entry["data"]["outcome"] == "justified" and entry["data"]["notes"].startswith("real")

    normal = api(
        "POST", "/api/v1/requests", {"entitlement": "kv-read", "reason": "x", "duration": "5m"}
    ).json
    assert review(api, normal["id"], "dave").json["error"] == "not_break_glass"


def test_the_requester_who_is_also_a_reviewer_still_cannot_review(app, api_for, alerts):
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", EMERGENCY, "bob").json["id"]  # engineers+security
    assert review(api, grant_id, "bob").json["error"] == "self_review"
    assert review(api, grant_id, "frank").status_code == 200  # auditors review any


def test_another_identity_of_the_requester_cannot_review(app, api_for, alerts):
    """bob2 is Bob's second account (the same verified email): reviewing Bob's emergency is
    reviewing himself; bob-unverified only claims Bob's address, unverified: someone else."""
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", EMERGENCY, "bob").json["id"]
    refused = review(api, grant_id, "bob2")
    assert (refused.status_code, refused.json["error"]) == (403, "self_review")
    assert "review" not in types(grants_of(app), grant_id)
    assert review(api, grant_id, "bob-unverified").status_code == 200


def test_an_overdue_review_shows_on_readyz_without_stopping_issuing(app, api_for, alerts):
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", EMERGENCY).json["id"]
    health = app.test_client().get("/readyz").json["checks"]["reviews"]
    assert health == {"ok": True, "overdue": 0, "grants": []}
    store = app.extensions["jit"].grants.store
    with store.transaction() as tx:
        tx.move_grant(grant_id, "active", review_due="2000-01-01T00:00:00Z")
    health = app.test_client().get("/readyz").json["checks"]["reviews"]
    assert health == {"ok": True, "overdue": 1, "grants": [grant_id]}
    assert api("POST", "/api/v1/requests", EMERGENCY, "bob").status_code == 201
    assert review(api, grant_id, "dave").status_code == 200
    late = app.extensions["jit"].grants.chain(grant_id)[-1]["data"]
    assert late["late"] is True
    assert app.test_client().get("/readyz").json["checks"]["reviews"]["overdue"] == 0


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('reviewers = ["security"]', "break_glass needs groups"),
        ('groups = ["sre"]', "break_glass needs reviewers"),
        ('groups = ["sre"]\nreviewers = ["security"]\nmax_duration = "3h"',
         "break_glass.max_duration 3h is longer than max_duration 2h"),
        ('groups = ["sre"]\nreviewers = ["security"]\nreview_within = "soon"',
         "review_within"),
        ('groups = ["sre"]\nreviewers = ["security"]\napprovers = ["x"]',
         "unknown key 'approvers'"),
    ],
)  # fmt: skip
def test_the_policy_table_is_checked_with_line_numbers(table, problem):
    text = f"""
[entitlements.fix]
vault_policies = ["p"]
max_duration = "2h"
requesters = {{ groups = ["sre"] }}

[entitlements.fix.break_glass]
{table}
"""
    policy, problems = check_policy_text(text, POLICY_KINDS)
    assert policy is None
    assert any(problem in p.message and p.line for p in problems), problems


def test_the_default_break_glass_maximum_never_exceeds_the_entitlements():
    text = """
[entitlements.fix]
vault_policies = ["p"]
max_duration = "15m"
requesters = { groups = ["sre"] }
break_glass = { groups = ["sre"], reviewers = ["security"] }
"""
    policy, problems = check_policy_text(text, POLICY_KINDS)
    assert problems == [] and policy.entitlements["fix"].break_glass.max_duration == 15 * 60


def test_the_ui_offers_break_glass_and_the_reviewer_a_review_form(app, alerts):
    alice = browser(app, "alice")
    assert "Break glass" in page(alice, "/")  # offered on the home page, on its own page
    home = page(alice, "/request?entitlement=prod-fix&break_glass=1")
    assert 'name="break_glass"' in home and "for prod-fix" in home
    assert "security channel is alerted" in home  # the confirmation says who is told
    token = re.search(r'name="csrf_token" value="([^"]+)"', home)[1]
    form = {**EMERGENCY, "break_glass": "1", "csrf_token": token}
    issued = alice.post("/requests", data=form, follow_redirects=True)
    assert issued.status_code == 200 and "Vault token" in issued.get_data(as_text=True)
    (grant,) = app.extensions["jit"].grants.store.search_grants(entitlement="prod-fix")
    assert page(alice, f"/requests/{grant.id}").count("Record the review") == 0

    dave = browser(app, "dave")
    text = page(dave, f"/requests/{grant.id}")
    assert "Break-glass grant:" in text and "Record the review" in text
    token = re.search(r'name="csrf_token" value="([^"]+)"', text)[1]
    done = dave.post(
        f"/requests/{grant.id}/review",
        data={"outcome": "justified", "notes": "confirmed outage", "csrf_token": token},
    )
    assert done.status_code == 302
    assert "Reviewed by dave@example.com" in page(dave, f"/requests/{grant.id}")
    assert "Break glass" not in page(browser(app, "carol"), "/")
