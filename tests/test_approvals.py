"""The approval workflow end to end: real access tokens from the OIDC provider, real tokens from
OpenBao. Separation of duties, refusals that change nothing, races settled once, the window
starting at issuance, eligibility checked again at activation, policy reloads."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from broker.models import parse_time, utcnow
from scripts.launchers import client_credentials_token
from tests.helpers import (
    APPROVAL_POLICY,
    HttpReceiver,
    browser,
    csrf,
    grants_of,
    token_works,
    types,
)


@pytest.fixture
def app(make_app):
    return make_app(policy_text=APPROVAL_POLICY)


@pytest.fixture
def api(app, tokens):
    client = app.test_client()

    def call(user, method, path, body=None):
        token = tokens(user) if "." not in user else user
        return client.open(
            f"/api/v1{path}", method=method, json=body, headers={"Authorization": f"Bearer {token}"}
        )

    return call


def ask(api, user="alice", entitlement="db-admin", **body):
    body = {"entitlement": entitlement, "reason": "INC-9 fix the index", "ticket": "INC-9", **body}
    response = api(user, "POST", "/requests", body)
    assert response.status_code == 201, response.json
    return response.json


def test_a_request_needing_approval_waits_and_issues_nothing(api, app, openbao):
    before = set(openbao.client().list("auth/token/accessors")["data"]["keys"])
    pending = ask(api)
    assert pending["status"] == "pending"
    assert "credential" not in pending
    assert pending["window"] == {"start": "", "end": ""}
    assert pending["approvals"]["required"] == 1 and pending["approvals"]["given"] == []
    assert pending["approvals"]["missing"]
    assert pending["duration"] == 600  # the entitlement's default duration
    assert set(openbao.client().list("auth/token/accessors")["data"]["keys"]) <= before

    queue = api("bob", "GET", "/requests?pending_approval=1").json["requests"]
    assert pending["id"] in [r["id"] for r in queue]
    assert api("carol", "GET", "/requests?pending_approval=1").json["requests"] == []
    assert api("bob", "GET", f"/requests/{pending['id']}").status_code == 200
    assert api("carol", "GET", f"/requests/{pending['id']}").status_code == 404


def test_approve_then_activate_issues_to_the_requester_with_the_window_from_now(api, app, openbao):
    pending = ask(api)
    approved = api("bob", "POST", f"/requests/{pending['id']}/approve", {"reason": "ok"})
    assert approved.status_code == 200, approved.json
    assert approved.json["status"] == "approved"
    assert "credential" not in approved.json  # the approver never sees the secret
    assert [a["by"] for a in approved.json["approvals"]["given"]] == ["bob@example.com"]

    time.sleep(1.1)  # the window must start at issuance, not at request or approval
    issued_after = utcnow().replace(microsecond=0)
    assert api("bob", "POST", f"/requests/{pending['id']}/activate").status_code == 404
    active = api("alice", "POST", f"/requests/{pending['id']}/activate")
    assert active.status_code == 200, active.json
    body = active.json
    assert body["status"] == "active"
    start, end = parse_time(body["window"]["start"]), parse_time(body["window"]["end"])
    assert start >= issued_after and end - start == timedelta(minutes=10)
    assert token_works(openbao, body["credential"]["token"])
    assert types(grants_of(app), pending["id"]) == [
        "request",
        "decision",
        "approval",
        "decision",
        "issue",
    ]

    again = api("alice", "POST", f"/requests/{pending['id']}/activate")
    assert again.status_code == 409


@pytest.mark.parametrize(
    ("requester", "approver", "status", "error"),
    [
        ("bob", "bob", 403, "self_approval"),
        ("alice", "carol", 403, "not_an_approver"),
        ("alice", "alice", 403, "self_approval"),
    ],
)
def test_separation_of_duties(api, app, requester, approver, status, error):
    pending = ask(api, requester)
    response = api(approver, "POST", f"/requests/{pending['id']}/approve")
    assert response.status_code == status, response.json
    assert response.json["error"] == error and response.json["detail"]
    assert grants_of(app).store.get_grant(pending["id"]).status == "pending"
    assert "approval" not in types(grants_of(app), pending["id"])


def test_an_agent_never_approves(api, app, oidc_provider, oidc_client_secret):
    from scripts.launchers import agent_secret

    agent = client_credentials_token(
        oidc_provider, "ci-agent", agent_secret(oidc_client_secret), oidc_provider.api_resource
    )
    pending = ask(api)
    response = api(agent, "POST", f"/requests/{pending['id']}/approve")
    assert response.status_code == 403
    assert response.json["error"] == "agent_cannot_approve"


def test_a_person_counts_once_and_each_group_must_approve(api, app):
    pending = ask(api, entitlement="two-keys", duration="5m")
    assert api("erin", "POST", f"/requests/{pending['id']}/approve").status_code == 200
    twice = api("erin", "POST", f"/requests/{pending['id']}/approve")
    assert twice.status_code == 409 and twice.json["error"] == "already_approved"
    still = api("alice", "GET", f"/requests/{pending['id']}").json
    assert still["status"] == "pending" and still["approvals"]["missing"]

    done = api("dave", "POST", f"/requests/{pending['id']}/approve")
    assert done.status_code == 200 and done.json["status"] == "approved"


def test_deny_closes_the_request_with_the_reason(api, app):
    pending = ask(api)
    assert api("bob", "POST", f"/requests/{pending['id']}/deny", {}).status_code == 400
    denied = api("bob", "POST", f"/requests/{pending['id']}/deny", {"reason": "use read-only"})
    assert denied.status_code == 200 and denied.json["status"] == "denied"
    seen = api("alice", "GET", f"/requests/{pending['id']}").json
    assert seen["closed_reason"] == "use read-only"
    for user, action in [
        ("bob", "approve"),
        ("dave", "deny"),
        ("alice", "activate"),
        ("alice", "cancel"),
    ]:
        late = api(user, "POST", f"/requests/{pending['id']}/{action}", {"reason": "late"})
        assert late.status_code == 409, (action, late.json)
    assert types(grants_of(app), pending["id"]) == ["request", "decision", "denial"]


def test_cancel_withdraws_and_nobody_can_approve_after(api, app):
    pending = ask(api)
    assert api("bob", "POST", f"/requests/{pending['id']}/cancel").status_code == 404
    cancelled = api("alice", "POST", f"/requests/{pending['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled"
    assert api("bob", "POST", f"/requests/{pending['id']}/approve").status_code == 409


def test_an_unapproved_request_expires(api, app):
    pending = ask(api)
    grants = grants_of(app)
    due = parse_time(grants.store.get_grant(pending["id"]).due_at)
    assert due - parse_time(pending["created_at"]) == timedelta(hours=1)
    grants.reap_due(due)
    assert grants.store.get_grant(pending["id"]).status == "expired_unapproved"
    assert types(grants_of(app), pending["id"])[-1] == "expire_unapproved"
    assert api("bob", "POST", f"/requests/{pending['id']}/approve").status_code == 409


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"ticket": "JIRA-1"}, "ticket_mismatch"),
        ({"ticket": ""}, "ticket_required"),
        ({"reason": "abc"}, "reason_too_short"),
        ({"duration": "2h"}, "duration_too_long"),
    ],
)
def test_policy_rules_refuse_with_the_rule_named(api, app, body, error):
    request = {
        "entitlement": "db-admin",
        "reason": "INC-9 fix the index",
        "ticket": "INC-9",
        **body,
    }
    response = api("alice", "POST", "/requests", request)
    assert response.status_code == 422, response.json
    assert response.json["error"] == error and response.json["detail"]
    count = grants_of(app).store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"]
    assert count == 0


def test_two_approvers_at_once_approve_once_and_one_activation_wins(api, app, openbao):
    pending = ask(api)
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda user: api(user, "POST", f"/requests/{pending['id']}/approve").status_code,
                ["dave", "erin"],
            )
        )
    assert sorted(answers) == [200, 409]
    assert types(grants_of(app), pending["id"]).count("approval") == 1

    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda _: api("alice", "POST", f"/requests/{pending['id']}/activate"), [1, 2])
        )
    assert sorted(r.status_code for r in results) == [200, 409]
    assert types(grants_of(app), pending["id"]).count("issue") == 1
    vault = openbao.client()
    tokens_for_grant = [
        accessor
        for accessor in vault.list("auth/token/accessors")["data"]["keys"]
        if (vault.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}).get(
            "jit_grant_id"
        )
        == pending["id"]
    ]
    assert len(tokens_for_grant) == 1


def test_cancel_racing_approve_ends_in_one_consistent_state(api, app):
    for _ in range(3):
        pending = ask(api)
        with ThreadPoolExecutor(2) as pool:
            approve = pool.submit(api, "bob", "POST", f"/requests/{pending['id']}/approve")
            cancel = pool.submit(api, "alice", "POST", f"/requests/{pending['id']}/cancel")
            codes = (approve.result().status_code, cancel.result().status_code)
        status = grants_of(app).store.get_grant(pending["id"]).status
        assert (status, codes) in {
            ("cancelled", (409, 200)),
            ("cancelled", (200, 200)),
            ("approved", (200, 409)),
        }, (status, codes)
        if status == "cancelled":
            assert api("alice", "POST", f"/requests/{pending['id']}/activate").status_code == 409


def test_eligibility_is_checked_again_at_activation_and_policy_reloads(api, app, openbao):
    pending = ask(api)
    api("bob", "POST", f"/requests/{pending['id']}/approve")
    policy_path = app.extensions["jit"].settings.policy_path
    old = app.extensions["jit"].policy.current().version

    policy_path.write_text(APPROVAL_POLICY.replace('groups = ["engineers"]', 'groups = ["sre"]'))
    refused = api("alice", "POST", f"/requests/{pending['id']}/activate")
    assert refused.status_code == 403 and refused.json["error"] == "not_eligible"
    assert app.extensions["jit"].policy.current().version != old
    grant = grants_of(app).store.get_grant(pending["id"])
    assert grant.status == "denied" and "refused at activation" in grant.closed_reason
    assert grant.handle == ""
    assert types(grants_of(app), pending["id"])[-1] == "decision"
    assert grants_of(app).chain(pending["id"])[-1]["data"]["allowed"] is False


def test_a_broken_policy_edit_keeps_the_last_good_policy(api, app):
    policy_file = app.extensions["jit"].policy
    good = policy_file.current().version
    policy_file.path.write_text("[entitlements.db-admin\nthis is not toml")
    assert policy_file.current().version == good
    assert "not valid TOML" in policy_file.last_error or policy_file.last_error
    assert ask(api)["status"] == "pending"


def test_webhooks_tell_approvers_and_the_requester(make_app, tokens):
    receiver = HttpReceiver(path="/hooks/secret-path")
    try:
        app = make_app(policy_text=APPROVAL_POLICY, notify={"webhook_url": receiver.url})
        client = app.test_client()

        def call(user, path, body=None):
            return client.post(
                f"/api/v1{path}", json=body, headers={"Authorization": f"Bearer {tokens(user)}"}
            )

        grant_id = call(
            "alice",
            "/requests",
            {"entitlement": "db-admin", "ticket": "INC-1", "reason": "INC-1 webhooks"},
        ).json["id"]
        call("bob", f"/requests/{grant_id}/approve")
        assert app.extensions["jit"].notifier.wait_idle(10)
        events = [(m["jit"]["event"], m["jit"]["audience"]) for m in receiver.bodies]
        assert events == [("new_request", "approvers"), ("approved", "requester")]
        assert all(m["jit"]["grant_id"] == grant_id and m["text"] for m in receiver.bodies)
    finally:
        receiver.stop()
        app.extensions["jit"].stop()


def test_extend_gives_a_new_credential_for_the_longer_window_and_removes_the_old(api, app, openbao):
    first = ask(api, entitlement="stretchy", duration="10m")
    old_secret = first["credential"]["token"]
    extended = api("alice", "POST", f"/requests/{first['id']}/extend", {"duration": "5m"})
    assert extended.status_code == 200, extended.json
    new_end = parse_time(extended.json["window"]["end"])
    assert new_end - parse_time(first["window"]["end"]) == timedelta(minutes=5)
    new_secret = extended.json["credential"]["token"]
    assert new_secret != old_secret
    assert token_works(openbao, new_secret) and not token_works(openbao, old_secret)
    expires = openbao.client().auth.token.lookup(new_secret)["data"]["expire_time"]
    assert new_end - timedelta(seconds=1) <= parse_time(expires[:19] + "Z") <= new_end
    assert types(grants_of(app), first["id"])[-4:] == ["decision", "extend", "revoke", "verify"]

    too_long = api("alice", "POST", f"/requests/{first['id']}/extend", {"duration": "6m"})
    assert too_long.status_code == 422 and too_long.json["error"] == "extension_too_long"
    assert (
        api("alice", "POST", f"/requests/{first['id']}/extend", {"duration": "5m"}).status_code
        == 200
    )
    past_total = api("alice", "POST", f"/requests/{first['id']}/extend", {"duration": "1m"})
    assert past_total.status_code == 422 and past_total.json["error"] == "extension_too_long"
    assert (
        api("bob", "POST", f"/requests/{first['id']}/extend", {"duration": "1m"}).status_code == 404
    )

    api("alice", "POST", f"/requests/{first['id']}/release")
    late = api("alice", "POST", f"/requests/{first['id']}/extend", {"duration": "1m"})
    assert late.status_code == 409


def test_an_entitlement_without_extension_rules_cannot_be_extended(api, app):
    pending = ask(api)
    api("bob", "POST", f"/requests/{pending['id']}/approve")
    api("alice", "POST", f"/requests/{pending['id']}/activate")
    refused = api("alice", "POST", f"/requests/{pending['id']}/extend", {"duration": "1m"})
    assert refused.status_code == 422 and refused.json["error"] == "extension_not_allowed"
    assert (
        api("alice", "POST", f"/requests/{pending['id']}/extend", {"duration": "soon"}).status_code
        == 400
    )


def test_auto_approval_is_recorded_as_such(api, app):
    auto = ask(api, "bob", entitlement="oncall-fix", duration="5m")
    assert auto["status"] == "active" and auto["credential"]["token"]
    decision = grants_of(app).chain(auto["id"])[1]["data"]
    assert decision["auto_approved"] and "security" in decision["auto_approved"]
    assert decision["approvals_required"] == 0
    waiting = ask(api, "alice", entitlement="oncall-fix", duration="5m")
    assert waiting["status"] == "pending"  # alice is not in the auto-approve group


def test_a_limit_on_open_grants_is_enforced_and_freed_on_release(api, app):
    first = ask(api, "bob", entitlement="oncall-fix", duration="5m")
    second = api(
        "bob",
        "POST",
        "/requests",
        {"entitlement": "oncall-fix", "duration": "5m", "reason": "a second one"},
    )
    assert second.status_code == 409 and second.json["error"] == "limit_reached"
    api("bob", "POST", f"/requests/{first['id']}/release")
    assert ask(api, "bob", entitlement="oncall-fix", duration="5m")["status"] == "active"


def test_outside_its_schedule_an_entitlement_is_refused_naming_the_schedule(make_app, tokens):
    tomorrow = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(utcnow().weekday() + 1) % 7]
    policy = (
        APPROVAL_POLICY
        + f"""
[entitlements.tomorrow-only]
vault_policies = ["jit-test-read"]
max_duration = "10m"

[entitlements.tomorrow-only.requesters]
groups = ["engineers"]

[entitlements.tomorrow-only.schedule]
timezone = "UTC"
days = ["{tomorrow}"]
"""
    )
    response = (
        make_app(policy_text=policy)
        .test_client()
        .post(
            "/api/v1/requests",
            json={"entitlement": "tomorrow-only", "duration": "5m", "reason": "not today"},
            headers={"Authorization": f"Bearer {tokens('alice')}"},
        )
    )
    assert response.status_code == 422
    assert response.json["error"] == "outside_schedule"
    assert tomorrow in response.json["detail"]


# --- one person, several identities (issue 10, item 2) --------------------------------------------
# The provider has bob2: another account of Bob's, with his verified email written in other case,
# and bob-unverified, another person's account claiming bob@example.com, which the provider
# never verified.

TWO_PEOPLE_POLICY = (
    APPROVAL_POLICY
    + """
[entitlements.two-people]
description = "Needs two people from security"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.two-people.requesters]
groups = ["engineers"]

[entitlements.two-people.approval]
required = 2
from_groups = ["security"]
"""
)


@pytest.fixture
def two_people_api(make_app, tokens):
    app = make_app(policy_text=TWO_PEOPLE_POLICY)
    client = app.test_client()

    def call(user, method, path, body=None):
        headers = {"Authorization": f"Bearer {tokens(user)}"}
        return client.open(f"/api/v1{path}", method=method, json=body, headers=headers)

    call.app = app
    return call


def test_another_identity_with_the_requesters_verified_email_cannot_approve(api, app):
    pending = ask(api, "bob")
    for decision, body in (("approve", None), ("deny", {"reason": "no"})):
        response = api("bob2", "POST", f"/requests/{pending['id']}/{decision}", body)
        assert response.status_code == 403, response.json
        assert response.json["error"] == "self_approval"
    assert grants_of(app).store.get_grant(pending["id"]).status == "pending"
    assert types(grants_of(app), pending["id"]) == ["request", "decision"]

    # The queue offers bob2 other people's requests, never Bob's.
    others = ask(api, "alice")
    queue = [r["id"] for r in api("bob2", "GET", "/requests?pending_approval=1").json["requests"]]
    assert others["id"] in queue and pending["id"] not in queue

    done = api("dave", "POST", f"/requests/{pending['id']}/approve")
    assert done.status_code == 200 and done.json["status"] == "approved"


def test_in_the_browser_too_another_identity_with_the_requesters_email_cannot_approve(api, app):
    """The browser path: the claims a session keeps (the approvals page) and those the provider
    confirms before an approval (the refresh) carry email_verified as bearer tokens do."""
    pending, others = ask(api, "bob"), ask(api, "alice")
    bob2 = browser(app, "bob2")
    queue = bob2.get("/approvals").get_data(as_text=True)
    assert others["id"] in queue and pending["id"] not in queue
    token = csrf(bob2.get("/").get_data(as_text=True))
    refused = bob2.post(f"/requests/{pending['id']}/approve", data={"csrf_token": token})
    assert refused.status_code == 403, refused.get_data(as_text=True)
    assert "you cannot approve your own request" in refused.get_data(as_text=True)
    assert grants_of(app).store.get_grant(pending["id"]).status == "pending"
    assert types(grants_of(app), pending["id"]) == ["request", "decision"]

    unverified = browser(app, "bob-unverified")  # claims Bob's address, unverified: not Bob
    token = csrf(unverified.get("/").get_data(as_text=True))
    done = unverified.post(f"/requests/{pending['id']}/approve", data={"csrf_token": token})
    assert done.status_code == 302, done.get_data(as_text=True)
    assert grants_of(app).store.get_grant(pending["id"]).status == "approved"


def test_an_unverified_email_makes_nobody_the_same_person(api, app):
    """Anyone can claim an address the provider did not verify: an account claiming
    bob@example.com unverified is not Bob, just another approver."""
    pending = ask(api, "bob")
    response = api("bob-unverified", "POST", f"/requests/{pending['id']}/approve")
    assert response.status_code == 200, response.json
    assert response.json["status"] == "approved"


def test_one_person_counts_once_whichever_identity_approves(two_people_api):
    api = two_people_api
    pending = ask(api, entitlement="two-people", duration="5m")
    assert api("bob", "POST", f"/requests/{pending['id']}/approve").status_code == 200
    twice = api("bob2", "POST", f"/requests/{pending['id']}/approve")
    assert twice.status_code == 409 and twice.json["error"] == "already_approved"
    still = api("alice", "GET", f"/requests/{pending['id']}").json
    assert still["status"] == "pending" and still["approvals"]["missing"] == ["1 more approval"]
    assert pending["id"] not in [
        r["id"] for r in api("bob2", "GET", "/requests?pending_approval=1").json["requests"]
    ]

    done = api("dave", "POST", f"/requests/{pending['id']}/approve")
    assert done.status_code == 200 and done.json["status"] == "approved"
    assert [a["by"] for a in done.json["approvals"]["given"]] == [
        "bob@example.com",
        "dave@example.com",
    ]

    # bob2 and someone with another address are two people.
    other = ask(api, entitlement="two-people", duration="5m")
    assert api("bob2", "POST", f"/requests/{other['id']}/approve").status_code == 200
    done = api("dave", "POST", f"/requests/{other['id']}/approve")
    assert done.status_code == 200 and done.json["status"] == "approved"


def test_both_identities_approving_at_once_count_as_one_person(two_people_api):
    api = two_people_api
    store = grants_of(api.app).store
    pending = ask(api, entitlement="two-people", duration="5m")
    path = f"/requests/{pending['id']}/approve"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda user: api(user, "POST", path), ["bob", "bob2"] * 6))
    assert sorted(r.status_code for r in answers) == [200] + [409] * 11, [r.json for r in answers]
    assert {r.json["error"] for r in answers if r.status_code == 409} == {"already_approved"}
    assert store.get_grant(pending["id"]).status == "pending"
    assert len(store.approvals_of(pending["id"])) == 1
    assert types(grants_of(api.app), pending["id"]).count("approval") == 1

    done = api("dave", "POST", path)
    assert done.status_code == 200 and done.json["status"] == "approved"


def test_the_dashboard_counts_each_grant_from_its_own_chain(api, app, openbao):
    """The auditors' dashboard, read in one pass over the log: a grant approved, activated and
    released (waiting for the verdict) counts once on today, with its time to approve and its
    revocation lag taken from its own entries; a second grant still pending adds a grant and no
    timing; nothing counts as a failed removal."""
    from broker.audit import dashboard

    approved = ask(api)
    assert (
        api("bob", "POST", f"/requests/{approved['id']}/approve", {"reason": "ok"}).status_code
        == 200
    )
    assert api("alice", "POST", f"/requests/{approved['id']}/activate").status_code == 200
    released = api("alice", "POST", f"/requests/{approved['id']}/release?wait=verified")
    assert released.json["status"] == "revoked"
    ask(api, reason="INC-10 a second look", ticket="INC-10")
    store = grants_of(app).store
    chain = {entry["type"]: entry for entry in store.audit_entries(approved["id"])}
    now = utcnow()

    found = dashboard.figures(store, store.search_grants(limit=100), now)

    def seconds(since, until):
        return int(
            (parse_time(chain[until]["at"]) - parse_time(chain[since]["at"])).total_seconds()
        )

    assert found.grants == 2
    assert found.grants_per_day == {"db-admin": [0] * 13 + [2]}
    assert found.approve_seconds == [seconds("request", "approval")]
    assert found.revocation_lag_seconds == [max(0, seconds("release", "verify"))]
    assert chain["verify"]["data"]["gone"] is True
    assert found.failed_removals_per_day == [0] * 14 and found.break_glass_per_day == [0] * 14
    assert dashboard.figures(store, [], now).grants == 0


def own_kept_figures(app, count):
    """The app's dashboard figures counted by `count` instead (a KeptFigures of the test's own in
    the services' place, started as the services start theirs)."""
    from broker.audit.kept_figures import KeptFigures

    services = app.extensions["jit"]
    services.dashboard.close()
    services.dashboard = KeptFigures(count)
    services.dashboard.start()
    return services.dashboard


def wait_until(done, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_dashboard_figures_are_counted_when_the_services_start(app):
    """No page asked: the services' start counted them, on the one kept thread."""
    kept = app.extensions["jit"].dashboard
    wait_until(lambda: kept._kept is not None, "the services' start counted nothing")
    assert kept._kept.grants == 0 and kept.failed() is None and kept._pool is not None


def test_the_dashboard_page_answers_from_figures_counted_in_the_background(api, app):
    """The figures are counted once when the services start; later loads answer at once from the
    kept figures, which a load finding them older than a minute has counted again in the
    background (the page says when they were counted)."""
    from broker.audit import kept_figures

    counts = []
    real_count = app.extensions["jit"].dashboard._count
    kept = own_kept_figures(app, lambda now: counts.append(now) or real_count(now))
    wait_until(lambda: kept._kept is not None, "the first count never landed")
    first = kept.get()
    assert kept.get() is first and len(counts) == 1  # fresh: nothing counted again
    ask(api)
    kept._fresh = 0  # every load now finds the figures stale
    assert kept.get() is first  # the stale figures at once; the recount runs meanwhile
    deadline = time.monotonic() + 10
    while kept.get() is first:
        assert time.monotonic() < deadline, "the background recount never landed"
        time.sleep(0.05)
    assert kept.get().grants == first.grants + 1
    assert kept._pool is not None
    kept._fresh = kept_figures.FRESH
    wait_until(lambda: not kept._counting, "a recount the polling above started never ended")
    counted_before_the_page = len(counts)
    page = browser(app, "frank").get("/audit/dashboard")
    assert page.status_code == 200
    shown = kept.get()
    assert f"{shown.grants} grants created" in page.text and shown.counted_at in page.text
    assert len(counts) == counted_before_the_page  # the page answered from the kept figures


def test_a_dashboard_load_before_the_first_count_answers_at_once_that_it_is_counting(app):
    """The first count held until the test lets it go: the page answers meanwhile, with no
    figures (no zeros standing in for them) and a message saying they are being counted; once
    the count lands, the next load shows them."""
    counting, release, counts = threading.Event(), threading.Event(), []
    real_count = app.extensions["jit"].dashboard._count

    def held_count(now):
        counts.append(now)
        counting.set()
        assert release.wait(30), "the test never released the count"
        return real_count(now)

    kept = own_kept_figures(app, held_count)
    assert counting.wait(10), "the services' start began no count"
    frank = browser(app, "frank")
    page = frank.get("/audit/dashboard")
    assert page.status_code == 200 and kept._counting  # answered while the count waits
    text = page.get_data(as_text=True)
    assert 'role="status"' in text and "The figures are being counted." in text
    assert "grants created" not in text and "<svg" not in text
    assert 'href="/audit/dashboard">Reload the dashboard</a>' in text
    again = frank.get("/audit/dashboard").get_data(as_text=True)
    assert "The figures are being counted." in again and len(counts) == 1  # one count, held

    release.set()
    wait_until(lambda: kept._kept is not None, "the released count never landed")
    shown = frank.get("/audit/dashboard").get_data(as_text=True)
    assert "0 grants created" in shown and kept._kept.counted_at in shown
    assert "being counted" not in shown


def test_a_failed_dashboard_count_says_so_and_the_next_load_counts_again(app):
    """A count that fails (the store unreadable, then an error of its own) leaves no page stuck
    'counting' and crashes none: each load says why the last count failed, without the
    exception's text, and starts another; once one succeeds the figures show, and a recount that
    fails later leaves them shown with a note."""
    from broker.errors import StoreUnavailable

    real_count = app.extensions["jit"].dashboard._count
    failures = [StoreUnavailable("database is locked"), RuntimeError("s3cr3t detail")]

    def failing_count(now):
        if failures:
            raise failures.pop(0)
        return real_count(now)

    kept = own_kept_figures(app, failing_count)
    wait_until(lambda: kept.failed() is not None, "the first count never failed")
    assert kept.get() is None  # and a second count starts
    frank = browser(app, "frank")
    wait_until(lambda: not kept._counting and len(failures) == 0, "no second count ran")
    first = kept.failed()
    page = frank.get("/audit/dashboard")  # the second failure shown; a third count starts
    text = page.get_data(as_text=True)
    assert page.status_code == 200 and 'role="status"' in text
    assert f"could not be counted at {first.at}: an unexpected error" in text
    assert "s3cr3t" not in text and "RuntimeError" not in text and "grants created" not in text
    wait_until(lambda: kept._kept is not None, "the count after the failures never landed")
    shown = frank.get("/audit/dashboard").get_data(as_text=True)
    assert "0 grants created" in shown and "could not be counted" not in shown
    assert "Counting the figures again failed" not in shown

    failures.append(StoreUnavailable("database is locked"))
    kept._fresh = 0
    kept.get()  # stale: a recount starts, and fails
    wait_until(lambda: kept.failed() is not None, "the recount never failed")
    kept._fresh = 3600  # the next loads start no count: the note stays
    shown = frank.get("/audit/dashboard").get_data(as_text=True)
    assert "Counting the figures again failed" in shown and "store could not be read" in shown
    assert "0 grants created" in shown
