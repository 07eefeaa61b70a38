"""Layer 5: GET /readyz says whether the broker can keep its promises (503: send the work to
another replica), GET /healthz whether it is alive (503: restart it), and the broker fails closed
(issues nothing new) when its audit log cannot be written or its reaper's heartbeat is stale.
Release and removal are never blocked. An unverified removal is an alert, not a reason to take
every replica out of service. Against real OpenBao, the real provider and real access tokens."""

import sqlite3
from datetime import timedelta

import pytest

from broker.backends import make_backends
from broker.backends.vault import make_client
from broker.models import Principal, isoformat, parse_time, utcnow
from scripts.launchers import free_port
from tests.helpers import browser, health, sqlite_only, token_works

ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-9 health"}


@pytest.fixture
def app(make_app):
    app = make_app(reaper={"enabled": True})
    yield app
    app.extensions["jit"].stop()


@pytest.fixture
def jit(app):
    return app.extensions["jit"]


@pytest.fixture
def api(app, api_for):
    return api_for(app)


def test_a_fresh_broker_is_healthy_and_failing_once_its_reaper_stops(app, jit):
    status, body = health(app)
    assert (status, body["status"]) == (200, "ok")
    checks = body["checks"]
    assert checks["store"]["ok"] and checks["vault"]["ok"] and checks["policy"]["ok"]
    assert checks["reaper"]["alive"] and checks["reaper"]["heartbeat_age"] < 5
    assert checks["revoke_failed"] == {"ok": True, "count": 0, "grants": []}
    assert set(checks["notifier"]) >= {"delivered", "failed_attempts", "dropped", "pending"}
    assert checks["provider"] == {"ok": True} and checks["reaper_lag"]["ok"]
    assert body["alerts"] == []
    alive = app.test_client().get("/healthz")
    assert (alive.status_code, alive.get_json()["status"]) == (200, "alive")
    assert alive.get_json()["threads"]["jit-reaper"] >= 1  # tests run many apps in one process

    jit.reaper.stop()
    status, body = health(app)
    assert (status, body["status"]) == (503, "failing")
    assert body["checks"]["reaper"] == {
        "ok": False,
        "alive": False,
        "error": "the reaper is not running",
    }
    dead = app.test_client().get("/healthz")
    assert dead.status_code == 503 and dead.get_json()["checks"]["reaper"]["alive"] is False


def test_unhealthy_broker_issues_nothing_but_release_still_works(app, jit, api):
    live = api("POST", "/api/v1/requests", ASK)
    assert live.status_code == 201
    held_before = len(jit.grants.backends["vault_token"].holdings())
    jit.reaper.stop()

    refused = api("POST", "/api/v1/requests", ASK)
    assert refused.status_code == 503
    assert refused.get_json()["error"] == "broker_unhealthy"
    assert "reaper is not running" in refused.get_json()["detail"]
    assert len(jit.grants.store.grants_in(("issuing", "active", "pending"))) == 1
    assert len(jit.grants.backends["vault_token"].holdings()) == held_before

    released = api("POST", f"/api/v1/requests/{live.get_json()['id']}/release")
    assert released.status_code == 200 and released.get_json()["status"] == "released"
    jit.grants.reap_due()
    assert jit.grants.store.get_grant(live.get_json()["id"]).status == "revoked"


def test_a_stale_heartbeat_refuses_issuing(app, jit, api):
    jit.grants.heartbeat = lambda: utcnow() - timedelta(minutes=10)
    refused = api("POST", "/api/v1/requests", ASK)
    assert refused.status_code == 503 and "heartbeat is 600s old" in refused.get_json()["detail"]
    assert jit.grants.store.grants_in(("issuing", "active")) == []
    assert health(app)[1]["status"] == "failing"


@sqlite_only  # SQLite's write lock held by another process (PostgreSQL: test_store_postgres)
def test_an_audit_log_that_cannot_be_written_refuses_issuing(app, jit, api):
    """Another process holds the database's write lock past the wait: the request's record
    cannot be committed, so Vault is never asked; /readyz says the store cannot be written."""
    store = jit.grants.store
    store.db.execute("PRAGMA busy_timeout = 200")  # this thread's connection: wait 0.2 s, not 30
    held_before = len(jit.grants.backends["vault_token"].holdings())
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        refused = api("POST", "/api/v1/requests", ASK)
        assert refused.status_code == 503
        assert refused.get_json()["error"] == "store_unavailable"
        assert "database is locked" in refused.get_json()["detail"]
        status, body = health(app)
        assert status == 503 and not body["checks"]["store"]["ok"]
        assert "database is locked" in body["checks"]["store"]["error"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert len(jit.grants.backends["vault_token"].holdings()) == held_before  # nothing issued
    assert store.grants_in(("issuing", "active", "pending")) == []


def test_a_revoke_failed_grant_is_an_alert_until_its_removal_is_verified(
    make_app, api_for, openbao
):
    app = make_app()  # no reaper thread: the test drives the retries itself
    grants = app.extensions["jit"].grants
    grants.heartbeat = utcnow  # as if a reaper were alive
    response = api_for(app)("POST", "/api/v1/requests", ASK)
    body = response.get_json()
    working = grants.backends
    grants.backends = make_backends(make_client(f"http://127.0.0.1:{free_port()}", "x", 2))
    grants.reap_due(parse_time(body["window"]["end"]))

    status, health_body = health(app)
    # Every replica would see the same grant: it stays in service and says so loudly.
    assert (status, health_body["status"]) == (200, "degraded")
    assert health_body["alerts"] == ["revoke_failed"]
    assert health_body["checks"]["revoke_failed"] == {
        "ok": False,
        "count": 1,
        "grants": [body["id"]],
    }
    assert token_works(openbao, body["credential"]["token"])  # honestly still alive

    grants.backends = working
    grants.reap_due(parse_time(grants.store.get_grant(body["id"]).due_at))
    assert grants.store.get_grant(body["id"]).status == "revoked"
    status, health_body = health(app)
    assert (status, health_body["status"]) == (200, "ok")


def test_vault_out_of_reach_is_not_ready_but_alive(make_app):
    app = make_app(vault={"addr": f"http://127.0.0.1:{free_port()}"})
    app.extensions["jit"].grants.heartbeat = utcnow
    status, body = health(app)
    assert (status, body["status"]) == (503, "failing")
    assert not body["checks"]["vault"]["ok"] and "unreachable" in body["checks"]["vault"]["error"]
    assert app.test_client().get("/healthz").status_code == 200  # a restart would not help


def test_a_provider_out_of_reach_is_not_ready(make_app):
    app = make_app(oidc={"issuer": f"http://127.0.0.1:{free_port()}"})
    app.extensions["jit"].grants.heartbeat = utcnow
    status, body = health(app)
    assert (status, body["status"]) == (503, "failing")
    assert body["alerts"] == ["provider"]
    assert "provider is unreachable" in body["checks"]["provider"]["error"]


def test_a_reaper_late_for_its_deadlines_is_not_ready(make_app, api_for):
    """A window that closed two minutes ago and no reaper pass since (a heartbeat that looks
    fresh, as when a reaper is stuck on a slow Vault): this replica should take no more work."""
    app = make_app()
    grants = app.extensions["jit"].grants
    grants.heartbeat = utcnow
    granted = api_for(app)("POST", "/api/v1/requests", ASK).get_json()
    ended = isoformat(utcnow() - timedelta(minutes=2))  # as if its window had ended then
    with grants.store.transaction() as tx:
        assert tx.move_grant(granted["id"], "active", window_end=ended, due_at=ended)

    status, body = health(app)
    assert (status, body["status"]) == (503, "failing")
    lag = body["checks"]["reaper_lag"]
    assert not lag["ok"] and 110 <= lag["late"] <= 130 and "late for its oldest" in lag["error"]
    grants.reap_due()
    assert health(app)[0] == 200


def test_the_home_page_warns_of_the_users_grants_whose_removal_is_unverified(
    make_app, oidc_provider
):
    app = make_app()
    grants = app.extensions["jit"].grants
    alice = Principal(
        oidc_provider.issuer, "alice", groups=("engineers",), email="alice@example.com"
    )
    grant, _ = grants.request(alice, "kv-read", "10m", "banner")
    # Signed in for real: sessions live in the broker's store, a cookie cannot carry claims.
    client = browser(app, "alice")
    assert "Access not yet removed" not in client.get("/").get_data(as_text=True)

    working = grants.backends
    grants.backends = make_backends(make_client(f"http://127.0.0.1:{free_port()}", "x", 2))
    grants.reap_due(parse_time(grant.window_end))
    page = client.get("/").get_data(as_text=True)
    assert "Access not yet removed" in page and f"/requests/{grant.id}" in page

    grants.backends = working
    grants.reap_due(parse_time(grants.store.get_grant(grant.id).due_at))
    assert "Access not yet removed" not in client.get("/").get_data(as_text=True)


def test_a_credential_that_cannot_be_recorded_is_revoked_at_once(jit, api, openbao, monkeypatch):
    """Layer 4: Vault issued, the record of it failed: the credential must not outlive the error."""
    from broker.store import Transaction

    real_append, backend = Transaction.append, jit.grants.backends["vault_token"]
    real_issue, issued = backend.issue, []

    def failing_append(self, at, type_, actor, grant_id, data):
        if type_ == "issue":
            raise sqlite3.OperationalError("disk I/O error")
        return real_append(self, at, type_, actor, grant_id, data)

    def watched_issue(*args, **kwargs):  # a spy: Vault really issues; we keep what it gave
        issued.append(real_issue(*args, **kwargs))
        return issued[-1]

    monkeypatch.setattr(Transaction, "append", failing_append)
    monkeypatch.setattr(backend, "issue", watched_issue)
    refused = api("POST", "/api/v1/requests", ASK)
    monkeypatch.undo()

    assert refused.status_code == 503, refused.get_json()
    assert "revoked at once" in refused.get_json()["detail"]
    assert len(issued) == 1 and not token_works(openbao, issued[0].secret)
    grant = jit.grants.store.db.execute("SELECT * FROM grants ORDER BY rowid").fetchall()[-1]
    assert grant["status"] == "issuing" and grant["handle"] == ""  # the reconciler settles it
