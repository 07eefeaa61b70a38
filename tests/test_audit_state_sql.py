"""The state check's first pass in the database (store/grant_chains.py) never keeps back a grant
the Python check (audit/state.py) would name: on the store under test, over chains of every shape
the broker writes and entries edited into shapes it never writes, `jit audit verify`'s state
check finds exactly what the Python check finds reading every grant, and the database vouches
for the grants that are fine."""

import json
import random

import pytest

from broker import audit
from broker.audit.log import AuditLog
from broker.audit.state import READS, ChainSays, GrantState, grant_problems
from broker.models import STATES, Approval, Grant

KEY = b"k" * 32
AT = "2026-11-01T00:00:00Z"
ENDS = ("2026-11-01T01:00:00Z", "2026-11-01T02:00:00Z", "2026-11-01T03:00:00Z")
PEOPLE = (("https://idp", "bob"), ("https://idp", "carol"), ("https://other", "bob"))
BROKER = {"iss": "jit-broker", "sub": "broker"}
KINDS = ("request", "decision", "approval", "denial", "cancel", "expire_unapproved",
         "issue_failed", "issue", "extend", "release", "expire", "revoke", "verify", "reconcile",
         "break_glass")  # fmt: skip


def python_only(store, key=KEY):
    """The state check as it was: every grant's row and entries read and judged in Python."""
    approvals = store.approvals_by_grant()
    return grant_problems(
        (GrantState(*row) for row in store.grant_states()),
        store.audit_grant_entries([str(kind) for kind in sorted(READS)]),
        lambda grant_id: approvals.get(grant_id, []),
        key,
    )


def grant(grant_id, status, handle="", window_end=ENDS[0]):
    return Grant(grant_id, "https://idp", "alice", "alice", "db-read", "INC-1", 3600, status, AT,
                 AT, window_end, "vault", "p", handle=handle)  # fmt: skip


def data_of(rng, kind, accessors):
    """An entry's data, mostly as the broker writes it, now and then not."""
    mark = audit.fingerprint(KEY, rng.choice(accessors))
    odd = rng.random() < 0.15
    if kind in ("issue", "extend"):
        data = {"backend": "vault", "handle": mark}
        if odd:
            data["handle"] = rng.choice([None, 7, "", ["x"]])
        if kind == "extend" or rng.random() < 0.3:
            data["window_end"] = rng.choice(ENDS)
        return data
    if kind in ("verify", "reconcile"):
        data = {"gone": rng.random() < 0.7, "handle": mark}
        if odd:
            data[rng.choice(["gone", "handle"])] = rng.choice([None, 1, "true", {"a": 1}])
        if rng.random() < 0.05:
            del data["handle"]
        return data
    if kind in ("release", "expire", "break_glass"):
        data = {"window_end": rng.choice(ENDS)}
        if odd:
            data["window_end"] = rng.choice([None, 3, ""])
        return data
    return {"note": kind}


def actor_of(rng, kind):
    if kind != "approval":
        return BROKER
    iss, sub = rng.choice(PEOPLE)
    actor = {"iss": iss, "sub": sub, "email": f"{sub}@example.com"}
    if rng.random() < 0.1:
        actor[rng.choice(["iss", "sub"])] = rng.choice([None, 5])
    return actor


def fill(store, rng, count):
    """`count` grants: a chain of random kinds each (the request first, most of the time), and
    a row that agrees with it (as the Python check reads the chain) or, now and then, not."""
    with store.transaction() as tx:
        for n in range(count):
            grant_id = f"g{n:04d}"
            accessors = [f"acc-{n}-{i}" for i in range(3)]
            kinds = [rng.choice(KINDS) for _ in range(rng.randrange(0, 7))]
            if rng.random() < 0.9:
                kinds.insert(0, "request")
            says = ChainSays()
            for kind in kinds:
                actor, data = actor_of(rng, kind), data_of(rng, kind, accessors)
                tx.append(AT, kind, actor, grant_id, data)
                says.read(kind, actor, data)
            if rng.random() < 0.1 and kinds:
                continue  # a chain and no row
            allowed, _ = says.statuses()
            status = rng.choice(allowed) if rng.random() < 0.85 else rng.choice(STATES)
            last = says.issued[-1] if says.issued else ""
            handle = next((a for a in accessors if audit.fingerprint(KEY, a) == last), "")
            if last and not handle:
                handle = "unknown-accessor"
            if rng.random() < 0.1:
                handle = rng.choice(["", *accessors])
            window_end = says.window_end or rng.choice(ENDS)
            if rng.random() < 0.1:
                window_end = rng.choice(ENDS)
            tx.insert_grant(grant(grant_id, status, handle, window_end))
            approvers = set(says.approvers)
            if rng.random() < 0.1:
                approvers ^= {rng.choice(PEOPLE)}
            for iss, sub in sorted(approvers):
                tx.add_approval(grant_id, Approval(iss, sub, sub, (), AT))


@pytest.mark.parametrize("seed", range(6))
def test_the_database_keeps_back_no_grant_the_python_check_names(make_store, seed):
    store = make_store()
    store.migrate()
    fill(store, random.Random(seed), 150)
    expected = python_only(store)
    assert expected, "the random table has some disagreements"
    assert AuditLog(store, KEY).grant_problems() == expected
    suspects = store.grants_unlike_chains(KEY)
    assert suspects is not None and len(suspects) < 150  # it vouched for some
    # Without a fingerprint key the handles are not compared, by either.
    assert AuditLog(store, b"").grant_problems() == python_only(store, b"")


# Entries edited into JSON the broker never writes, each of a grant whose row agrees with what
# the Python check reads: SQLite's JSON functions would read some of them otherwise (the first of
# a key written twice, an escaped key not matched, a NUL ending the text early).
EDITS = [
    ('{"gone":true,"handle":"%s","handle":"other"}', "verify"),
    ('{"handle":"other","handle":"%s"}', "issue"),
    ('{"h\\u0061ndle":"%s"}', "issue"),
    ('{"handle":"%s","note":"a\\"quote"}', "issue"),
    ('{"meta":{"handle":"%s"}}', "issue"),
    ('{"gone":true,"handle":"%s"} ', "verify"),
    ('["%s"]', "verify"),
    ('{"window_end":"2099-01-01T00:00:00Z","window_end":"%s"}', "release"),
]  # fmt: skip


@pytest.mark.parametrize("edit, kind", EDITS)
def test_json_the_broker_never_writes_is_judged_as_python_reads_it(make_store, edit, kind):
    store = make_store()
    store.migrate()
    mark = audit.fingerprint(KEY, "accessor")
    with store.transaction() as tx:
        tx.append(AT, "request", BROKER, "g1", {})
        tx.append(AT, "issue", BROKER, "g1", {"handle": mark, "window_end": ENDS[0]})
        tx.append(AT, "release", BROKER, "g1", {"window_end": ENDS[0]})
        tx.append(AT, "verify", BROKER, "g1", {"gone": True, "handle": mark})
        tx.insert_grant(grant("g1", "revoked", "accessor"))
    value = ENDS[0] if kind == "release" else mark
    store.db.execute(
        "UPDATE audit SET data = ? WHERE grant_id = 'g1' AND type = ?", [edit % value, kind]
    )
    expected = python_only(store)
    assert AuditLog(store, KEY).grant_problems() == expected
    for row_status in ("revoked", "released", "active"):
        store.db.execute("UPDATE grants SET status = ? WHERE id = 'g1'", [row_status])
        assert AuditLog(store, KEY).grant_problems() == python_only(store)


def test_data_that_is_not_json_is_judged_by_python(make_store):
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        tx.append(AT, "request", BROKER, "g1", {})
        tx.append(AT, "release", BROKER, "g1", {"window_end": ENDS[0]})
        tx.insert_grant(grant("g1", "released"))
    store.db.execute("UPDATE audit SET data = 'not json' WHERE type = 'release'")
    assert AuditLog(store, KEY).grant_problems() == python_only(store) == []
    store.db.execute("UPDATE grants SET status = 'active' WHERE id = 'g1'")
    assert AuditLog(store, KEY).grant_problems() == python_only(store) != []


def test_rows_without_entries_of_the_kinds_read_are_named(make_store):
    """g1's chain holds only a decision, g2 has none; a request without a grant id is no one's."""
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        tx.append(AT, "decision", BROKER, "g1", {"approved": True})
        tx.append(AT, "request", BROKER, "", {})
        tx.insert_grant(grant("g1", "pending"))
        tx.insert_grant(grant("g2", "pending"))
    assert (
        AuditLog(store, KEY).grant_problems()
        == python_only(store)
        == [
            "grant g1: a row with no request in the chain",
            "grant g2: a row with no request in the chain",
        ]
    )


def test_an_issue_failed_before_or_after_the_issue(make_store):
    """issue_failed closes a grant only while nothing was issued before it."""
    store = make_store()
    store.migrate()
    mark = audit.fingerprint(KEY, "accessor")
    with store.transaction() as tx:
        for grant_id, kinds in {
            "g1": ["issue_failed", "issue"],
            "g2": ["issue", "issue_failed"],
            "g3": ["issue_failed", "issue", "issue_failed"],
            "g4": ["denial", "issue_failed"],
            "g5": ["issue_failed", "cancel"],
        }.items():
            tx.append(AT, "request", BROKER, grant_id, {})
            for kind in kinds:
                tx.append(AT, kind, BROKER, grant_id, {"handle": mark})
            tx.insert_grant(grant(grant_id, "active", "accessor"))
    found = AuditLog(store, KEY).grant_problems()
    assert found == python_only(store)
    statuses = {problem.split(":")[0] for problem in found if ": status is active" in problem}
    assert statuses == {"grant g1", "grant g3", "grant g4", "grant g5"}
    assert "g2" not in (store.grants_unlike_chains(KEY) or [])


def test_an_extension_with_a_new_credential_is_vouched_for(make_store):
    """Two credentials issued, both verified gone: revoked, the handle the second's."""
    store = make_store()
    store.migrate()
    first, second = (audit.fingerprint(KEY, a) for a in ("acc-1", "acc-2"))
    with store.transaction() as tx:
        tx.append(AT, "request", BROKER, "g1", {})
        tx.append(AT, "issue", BROKER, "g1", {"handle": first, "window_end": ENDS[0]})
        tx.append(AT, "extend", BROKER, "g1", {"handle": second, "window_end": ENDS[1]})
        tx.append(AT, "release", BROKER, "g1", {"window_end": ENDS[1]})
        tx.append(AT, "verify", BROKER, "g1", {"gone": True, "handle": second})
        tx.insert_grant(grant("g1", "released", "acc-2", ENDS[1]))
    assert store.grants_unlike_chains(KEY) == []
    store.db.execute("UPDATE grants SET status = 'revoked'")
    assert store.grants_unlike_chains(KEY) == ["g1"]
    assert AuditLog(store, KEY).grant_problems() == python_only(store) != []
    with store.transaction() as tx:
        tx.append(AT, "verify", BROKER, "g1", {"gone": True, "handle": first})
    assert store.grants_unlike_chains(KEY) == []
    store.db.execute("UPDATE grants SET handle = 'acc-1'")
    assert (
        AuditLog(store, KEY).grant_problems()
        == python_only(store)
        == ["grant g1: credential handle is not the one its chain records as issued last"]
    )


def test_many_suspects_are_judged_in_one_pass(make_store, monkeypatch):
    monkeypatch.setattr("broker.audit.log.SUSPECTS_READ_APART", 3)
    store = make_store()
    store.migrate()
    fill(store, random.Random(7), 60)
    assert len(store.grants_unlike_chains(KEY) or []) > 3
    assert AuditLog(store, KEY).grant_problems() == python_only(store)


def test_handles_are_compared_by_their_hmac_under_a_key_of_any_length(make_store):
    """A row's handle is held against its chain's by chain.fingerprint's HMAC (computed by the
    broker: its key never goes to the database), for a key of any length."""
    store = make_store()
    store.migrate()
    for key in (b"k" * 32, b"short", bytes(range(100))):
        with store.transaction() as tx:
            tx.append(AT, "request", BROKER, "g1", {})
            tx.append(AT, "issue", BROKER, "g1", {"handle": audit.fingerprint(key, "é-accessor")})
            tx.insert_grant(grant("g1", "active", "é-accessor"))
        assert store.grants_unlike_chains(key) == []
        assert store.grants_unlike_chains(b"other") == ["g1"]
        store.db.execute("DELETE FROM audit")
        store.db.execute("DELETE FROM grants")


def test_suspects_are_read_by_id(make_store):
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        for grant_id in ("g1", "g2", "g3"):
            tx.append(AT, "request", BROKER, grant_id, {})
            tx.insert_grant(grant(grant_id, "pending"))
    assert [row[0] for row in store.grant_states(["g3", "g1"])] == ["g1", "g3"]
    entries = list(store.audit_grant_entries(["request"], ["g3", "g1"]))
    assert [(grant_id, kind) for grant_id, kind, *_ in entries] == [
        ("g1", "request"),
        ("g3", "request"),
    ]
    assert json.loads(entries[0][2]) == BROKER
