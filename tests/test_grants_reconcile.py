"""The reconciler against real OpenBao (and PostgreSQL): what Vault holds for the broker without a
live grant to account for it is revoked, verified gone, and written to the audit chain. This is
also the crash case of layer 4: a credential Vault issued but the broker never recorded."""

import threading
import time
import uuid
from datetime import timedelta

import pytest

from broker import audit
from broker.backends.token import VaultTokenBackend
from broker.models import ISSUING, Credential, Grant, isoformat, utcnow
from broker.reaper import Reaper
from tests.helpers import (
    ALICE,
    DATABASE_POLICY,
    LATER,
    connect_as,
    issue_unrecorded,
    login_refused,
    role_exists,
    token_works,
    wait_until,
)


@pytest.fixture
def grants(make_app):
    return make_app().extensions["jit"].grants


def record_issuing(grants, entitlement="kv-read", updated_at=None) -> Grant:
    """A grant row in `issuing`, as the broker records its intent before calling Vault."""
    now = isoformat(updated_at or utcnow())
    grant = Grant(
        id=str(uuid.uuid4()),
        requester_iss=ALICE.issuer,
        requester_sub=ALICE.subject,
        requester=ALICE.display,
        entitlement=entitlement,
        reason="crash test",
        duration=3600,
        status=ISSUING,
        created_at=now,
        window_start=now,
        window_end=isoformat(utcnow() + timedelta(hours=1)),
        backend=grants.policy().entitlements[entitlement].backend,
        policy_hash="x",
        updated_at=now,
    )
    with grants.store.transaction() as tx:
        tx.insert_grant(grant)
    return grant


def reconcile_entries(grants, grant_id):
    return [e for e in grants.chain(grant_id) if e["type"] == "reconcile"]


def test_a_token_issued_for_no_recorded_grant_is_revoked_and_chained(grants, openbao):
    grant_id = str(uuid.uuid4())
    credential = issue_unrecorded(grants, grant_id)
    assert token_works(openbao, credential.secret)

    findings = grants.reconcile()

    assert [(f["grant_id"], f["gone"], f["backend"]) for f in findings] == [
        (grant_id, True, "vault_token")
    ]
    assert not token_works(openbao, credential.secret)
    (entry,) = reconcile_entries(grants, grant_id)
    assert entry["actor"] == {"iss": "jit-broker", "sub": "reaper"}
    assert entry["data"]["handle"] == grants._fingerprint(credential.handle)
    assert entry["data"]["gone"] is True and entry["data"]["accepted"] is True
    assert "no grant" in entry["data"]["why"] and "jit-test-read" in entry["data"]["found"]
    assert credential.handle not in str(entry) and credential.secret not in str(entry)
    assert audit.verify(grants.store.audit_entries()).ok
    assert grants.reconcile() == []  # nothing left to find


def test_a_live_grants_credential_is_not_touched(grants, openbao):
    grant, credential = grants.request(ALICE, "kv-read", "30m", "live")
    assert grants.reconcile(now=utcnow() + LATER) == []
    assert token_works(openbao, credential.secret)
    assert grants.store.get_grant(grant.id).status == "active"
    grants.release(ALICE, grant.id)
    grants.reap_due()


def test_an_issuing_grant_is_left_alone_in_its_grace_period_then_given_up(grants, openbao):
    grant = record_issuing(grants)
    credential = issue_unrecorded(grants, grant.id)

    assert grants.reconcile() == []  # perhaps an issuance in flight right now
    assert token_works(openbao, credential.secret)
    assert grants.store.get_grant(grant.id).status == "issuing"

    (finding,) = grants.reconcile(now=utcnow() + LATER)
    assert finding["gone"] and finding["grant_status"] == "issuing"
    assert not token_works(openbao, credential.secret)
    failed = grants.store.get_grant(grant.id)
    assert failed.status == "issue_failed" and "left issuing" in failed.last_error
    assert [e["type"] for e in grants.chain(grant.id)] == ["issue_failed", "reconcile"]


def test_a_stale_issuing_grant_with_nothing_in_vault_becomes_issue_failed(grants):
    grant = record_issuing(grants, updated_at=utcnow() - LATER)
    assert grants.reconcile() == []
    assert grants.store.get_grant(grant.id).status == "issue_failed"
    assert grants.chain(grant.id)[-1]["type"] == "issue_failed"


def test_a_credential_its_grant_does_not_record_is_a_stray_after_the_grace(grants, openbao):
    grant, recorded = grants.request(ALICE, "kv-read", "30m", "extension left one behind")
    leftover = issue_unrecorded(grants, grant.id)

    assert grants.reconcile() == []  # an extension's new credential may not be recorded yet
    (finding,) = grants.reconcile(now=utcnow() + LATER)
    assert finding["handle"] == grants._fingerprint(leftover.handle)
    assert "another credential" in finding["why"]
    assert not token_works(openbao, leftover.secret)
    assert token_works(openbao, recorded.secret)
    grants.release(ALICE, grant.id)
    grants.reap_due()


def test_an_extension_claim_of_no_known_process_keeps_the_grace_period(grants, openbao):
    """A claim not stamped with a process (made by a broker that knew none) may be in flight:
    neither the reconciler nor the reaper acts on it before ISSUE_GRACE."""
    grant, recorded = grants.request(ALICE, "kv-read", "30m", "a claim without a stamp")
    with grants.store.transaction() as tx:
        tx.add_credential(
            Credential(str(uuid.uuid4()), grant.id, grant.backend, "", isoformat(utcnow()))
        )
    leftover = issue_unrecorded(grants, grant.id)

    assert grants.reconcile() == []
    assert token_works(openbao, leftover.secret)
    grants.release(ALICE, grant.id)
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoking"  # the claim may yet record
    assert not token_works(openbao, recorded.secret)

    (finding,) = grants.reconcile(now=utcnow() + LATER)
    assert "another credential" in finding["why"] and finding["gone"]
    assert not token_works(openbao, leftover.secret)
    grants.clock = lambda: utcnow() + LATER
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"


def test_a_token_of_an_ended_grant_is_a_stray(grants, openbao):
    grant, credential = grants.request(ALICE, "kv-read", "30m", "revoked, supposedly")
    with grants.store.transaction() as tx:  # as if a removal had been wrongly recorded
        tx.move_grant(grant.id, "active", status="revoked", due_at="")
    (finding,) = grants.reconcile()
    assert finding["grant_status"] == "revoked" and finding["gone"]
    assert not token_works(openbao, credential.secret)


def test_another_brokers_credentials_are_never_touched(grants, openbao):
    other = VaultTokenBackend(openbao.client(), instance="another-broker")
    chosen = grants.policy().entitlements["kv-read"]
    credential = other.issue(str(uuid.uuid4()), chosen, utcnow() + timedelta(hours=1), "bob")
    try:
        assert grants.reconcile() == []
        assert token_works(openbao, credential.secret)
    finally:
        other.revoke(credential.handle)


def test_a_legacy_token_without_the_broker_tag_is_claimed_only_for_a_known_grant(grants, openbao):
    client = openbao.client()

    def legacy_token(grant_id):
        return client.auth.token.create_orphan(
            policies=["jit-test-read"], ttl="1h", meta={"jit_grant_id": grant_id}
        )["auth"]

    unknown = legacy_token(str(uuid.uuid4()))
    grant = record_issuing(grants, updated_at=utcnow() - LATER)
    known = legacy_token(grant.id)
    try:
        findings = grants.reconcile()
        assert [f["grant_id"] for f in findings] == [grant.id]
        assert not token_works(openbao, known["client_token"])
        assert token_works(openbao, unknown["client_token"])  # perhaps another broker's
    finally:
        client.auth.token.revoke_accessor(unknown["accessor"])


def test_the_reaper_thread_reconciles_when_it_starts(grants, openbao):
    credential = issue_unrecorded(grants, str(uuid.uuid4()))
    reaper = Reaper(grants, heartbeat=1)
    reaper.start()
    try:
        for _ in range(100):
            if not token_works(openbao, credential.secret):
                break
            time.sleep(0.1)
        assert not token_works(openbao, credential.secret)
        assert reaper.heartbeat() is not None
    finally:
        reaper.stop()


# --- database users -------------------------------------------------------------------------


@pytest.fixture
def db_grants(make_app, postgres, database_engine, inventory):
    app = make_app(policy_text=DATABASE_POLICY, postgres={"dsn": postgres.dsn})
    return app.extensions["jit"].grants


def test_a_database_user_issued_but_never_recorded_is_removed(db_grants, postgres, openbao):
    grant_id = str(uuid.uuid4())
    credential = issue_unrecorded(db_grants, grant_id, "db-read", "database")
    user = {"username": credential.private["username"], "password": credential.secret}
    connect_as(postgres, user).close()

    (finding,) = db_grants.reconcile()

    assert (finding["grant_id"], finding["backend"], finding["gone"]) == (
        grant_id,
        "database",
        True,
    )
    assert login_refused(postgres, user)
    assert not role_exists(postgres, user["username"])
    roles = openbao.client().secrets.database.list_roles(mount_point="database")["data"]["keys"]
    assert not [role for role in roles if grant_id in role]  # the per-grant role went too
    (entry,) = reconcile_entries(db_grants, grant_id)
    assert "database user's child token" in entry["data"]["found"]
    assert credential.secret not in str(entry)


def test_a_live_database_user_is_not_touched(db_grants, postgres):
    grant, credential = db_grants.request(ALICE, "db-read", "10m", "live user")
    user = {"username": credential.private["username"], "password": credential.secret}
    assert db_grants.reconcile(now=utcnow() + LATER) == []
    connect_as(postgres, user).close()
    db_grants.release(ALICE, grant.id)
    db_grants.reap_due()
    assert login_refused(postgres, user)


def test_a_long_reconciliation_never_holds_up_removal(grants, openbao):
    """The sweep runs in its own thread: a window closing while it runs (here, held open until
    the removal is seen) is removed and verified meanwhile."""
    sweeping, done = threading.Event(), threading.Event()
    real_reconcile = grants.reconcile

    def long_reconcile():
        sweeping.set()
        done.wait(20)  # as a sweep over thousands of tokens would take
        return real_reconcile()

    grants.reconcile = long_reconcile
    grant, credential = grants.request(ALICE, "kv-read", "10m", "released mid-sweep")
    reaper = Reaper(grants, heartbeat=1)
    grants.on_change = reaper.wake
    reaper.start()
    try:
        assert sweeping.wait(5)
        grants.release(ALICE, grant.id)
        assert wait_until(lambda: grants.store.get_grant(grant.id).status == "revoked", 10)
        assert not done.is_set() and not token_works(openbao, credential.secret)
    finally:
        done.set()
        reaper.stop()
