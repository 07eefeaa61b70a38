"""The grants table held against the chain (`jit audit verify`'s state check, audit/state.py) as
the store reads it now: every grant row's few fields and the grants' entries of the kinds that
matter, as plain rows. Each edit of a row against its chain is named by grant and field, in the
same words as before, on the store under test (SQLite or PostgreSQL)."""

import pytest

from broker import audit
from broker.audit.log import AuditLog
from broker.models import Approval, Grant

KEY = b"k" * 32
ALICE = {"iss": "https://idp", "sub": "alice"}
BOB = {"iss": "https://idp", "sub": "bob"}
BROKER = {"iss": "jit-broker", "sub": "broker"}
END = "2026-11-01T01:00:00Z"


def grant(grant_id: str, status: str, handle: str) -> Grant:
    return Grant(grant_id, "https://idp", "alice", "alice", "db-read", "INC-1", 3600, status,
                 "2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z", END, "vault", "p",
                 handle=handle)  # fmt: skip


@pytest.fixture
def store(make_store):
    """Three grants as the broker leaves them: g1 revoked, g2 active after bob's approval, g3
    denied; entries the state check skips (decision, revoke) between them."""
    made = make_store()
    made.migrate()
    at = "2026-11-01T00:00:00Z"
    with made.transaction() as tx:
        for grant_id in ("g1", "g2", "g3"):
            tx.append(at, "request", ALICE, grant_id, {"entitlement": "db-read"})
            tx.append(at, "decision", BROKER, grant_id, {"approved": grant_id != "g3"})
        tx.append(at, "approval", BOB, "g2", {})
        tx.add_approval("g2", Approval("https://idp", "bob", "Bob", (), at))
        for grant_id in ("g1", "g2"):
            mark = audit.fingerprint(KEY, f"accessor-{grant_id}")
            tx.append(at, "issue", BROKER, grant_id, {"handle": mark, "window_end": END})
        tx.append(at, "release", ALICE, "g1", {"window_end": END})
        tx.append(at, "revoke", BROKER, "g1", {})
        tx.append(at, "verify", BROKER, "g1", {"gone": True, "handle": audit.fingerprint(
            KEY, "accessor-g1")})  # fmt: skip
        tx.append(at, "denial", BOB, "g3", {})
        tx.append(at, "test", ALICE, None, {})
        tx.insert_grant(grant("g1", "revoked", "accessor-g1"))
        tx.insert_grant(grant("g2", "active", "accessor-g2"))
        tx.insert_grant(grant("g3", "denied", ""))
    return made


def problems(store):
    return AuditLog(store, KEY).grant_problems()


def test_a_table_that_agrees_with_its_chain_has_no_problems(store):
    assert problems(store) == []
    assert sorted(row[0] for row in store.grant_states()) == ["g1", "g2", "g3"]


@pytest.mark.parametrize(
    "statement, expected",
    [
        ("UPDATE grants SET status = 'active' WHERE id = 'g1'",
         "grant g1: status is active, but its chain records the release and every credential "
         "verified gone (revoked)"),
        ("UPDATE grants SET status = 'active' WHERE id = 'g3'",
         "grant g3: status is active, but its chain ends in denied (denied)"),
        ("UPDATE grants SET window_end = '2099-01-01T00:00:00Z' WHERE id = 'g1'",
         f"grant g1: window end is 2099-01-01T00:00:00Z, but its chain says {END}"),
        ("UPDATE grants SET handle = 'other' WHERE id = 'g2'",
         "grant g2: credential handle is not the one its chain records as issued last"),
        ("UPDATE grants SET handle = '' WHERE id = 'g2'",
         "grant g2: credential handle is empty, but its chain records one issued"),
        ("UPDATE grants SET handle = 'x' WHERE id = 'g3'",
         "grant g3: credential handle is set, but its chain records no credential issued"),
        ("DELETE FROM approvals WHERE grant_id = 'g2'",
         "grant g2: approvals: the chain records an approval by bob (https://idp) that the "
         "table does not hold"),
        ("UPDATE approvals SET subject = 'mallory' WHERE grant_id = 'g2'",
         "grant g2: approvals: mallory (https://idp) approved in the table, but no approval "
         "entry of the chain records it"),
        ("DELETE FROM grants WHERE id = 'g3'",
         "grant g3: its chain has a request but the table no row"),
        ("UPDATE grants SET id = 'g9' WHERE id = 'g3'",
         "grant g9: a row with no request in the chain"),
        ("DELETE FROM audit WHERE type = 'verify'",
         "grant g1: status is revoked, but its chain records the release, not yet every "
         "credential gone (released or expired or revoking or revoke_failed)"),
    ],
)  # fmt: skip
def test_each_row_edited_against_its_chain_is_named(store, statement, expected):
    store.db.execute(statement)
    assert expected in problems(store)


def test_rows_and_entries_are_read_in_pages(store, monkeypatch):
    monkeypatch.setattr("broker.store.base.GRANT_PAGE", 2)
    assert problems(store) == []
    store.db.execute("UPDATE grants SET status = 'active' WHERE id = 'g3'")
    assert problems(store) == ["grant g3: status is active, but its chain ends in denied (denied)"]
