"""Verification over the stored canonical lines (issue 15): the bytes hashed are the bytes the
entry hash has always covered, for entries written before and after the change; every edited
column is still named; lookup goes through its index; the pages' verified mark advances in the
background, and a tamper behind it is still caught by a full verification. On the store under
test (SQLite or PostgreSQL)."""

import hashlib
import json

import pytest

from broker import audit
from broker.audit.lines import database_walk, sealed_entries
from broker.audit.log import AuditLog
from broker.store.base import _insert
from tests.helpers import sqlite_only
from tests.test_store import older_file

ALICE = {"iss": "https://idp", "sub": "alice", "name": 'Ålice "the" admin'}
KEY = b"k" * 32


def old_style(store, n: int, data: dict | None = None) -> None:
    """Entries as a broker before schema 10 wrote them: actor and data by plain json.dumps
    (spaces after separators, non-ASCII escaped), not canonical."""
    head = store.audit_head()
    for i in range(n):
        with store.transaction() as tx:
            content = data or {"n": i, "note": "naïve\n"}
            entry = audit.seal(head, f"2026-11-01T00:00:{i:02d}Z", "step", ALICE, "g1", content)
            columns = {"actor": json.dumps(entry["actor"]), "data": json.dumps(entry["data"])}
            _insert(tx.db, "audit", dict(entry, **columns))
            head = entry


def new_style(store, n: int, grant_id: str = "g1", data: dict | None = None) -> None:
    for i in range(n):
        with store.transaction() as tx:
            content = data or {"n": i, "list": [1, 2.5, None, True], "note": "naïve\n"}
            tx.append(f"2026-11-02T00:00:{i:02d}Z", "step", ALICE, grant_id, content)


@pytest.fixture
def store(make_store):
    made = make_store()
    made.migrate()
    return made


def test_the_stored_line_hashes_to_what_entry_hash_computes_old_entries_and_new(store):
    old_style(store, 3)
    new_style(store, 3)
    lines = list(store.audit_lines())
    entries = list(store.audit_entries())
    assert [line[0] for line in lines] == [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    for (_, _, _, hash_, line), entry in zip(lines, entries, strict=True):
        assert audit.entry_hash(entry) == hash_  # the hash as ever, decoded
        by_line = hashlib.sha256(line.encode()).hexdigest()
        if entry["seq"] > 3:  # written canonical: the line is exactly the bytes the hash covers
            assert by_line == hash_ and line.encode() == audit.canonical(
                {k: entry[k] for k in audit.chain.ENTRY_FIELDS}
            )
        else:  # written before: not the same bytes, so these are checked decoded
            assert by_line != hash_
    marked = list(sealed_entries(lines, store.audit_entry))
    assert [bool(e.get("_sealed")) for e in marked] == [False] * 3 + [True] * 3
    assert audit.verify(marked).ok
    result = AuditLog(store, KEY).verify()
    assert result.ok and result.checked == 6, str(result)


@pytest.mark.parametrize(
    "column, value",
    [
        ("data", '{"n":42}'),
        ("actor", '{"iss":"https://idp","sub":"mallory"}'),
        ("type", "approve"),
        ("at", "2026-11-02T00:00:09Z"),
        ("grant_id", "g2"),
        ("grant_id", None),
        ("prev", "f" * 64),
    ],
)
@pytest.mark.parametrize("seq", [2, 5])  # an entry written before schema 10, one after
def test_every_edited_column_is_named(store, column, value, seq):
    old_style(store, 3)
    new_style(store, 3)
    store.db.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", [value, seq])  # noqa: S608
    result = AuditLog(store, KEY).verify()
    assert not result.ok and result.bad_seq == seq, str(result)
    assert f"entry {seq} was edited: its content does not match its hash" in result.problem


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(store):
    new_style(store, 4)
    entry = store.audit_entry(2)
    entry["data"] = {"n": 99}
    entry["hash"] = audit.entry_hash(entry)
    store.db.execute(
        "UPDATE audit SET data = ?, hash = ? WHERE seq = 2",
        [audit.canonical(entry["data"]).decode(), entry["hash"]],
    )
    result = AuditLog(store, KEY).verify()
    assert not result.ok and result.bad_seq == 2 and "does not link" in result.problem


def test_a_column_re_encoded_with_the_same_meaning_still_verifies(store):
    """Spaces in the stored JSON change the line, not the entry: checked decoded, and intact."""
    new_style(store, 3)
    data = store.audit_entry(2)["data"]
    store.db.execute("UPDATE audit SET data = ? WHERE seq = 2", [json.dumps(data, indent=1)])
    assert AuditLog(store, KEY).verify().ok


def test_lookup_goes_through_the_index_and_a_value_not_there_is_not_found(store):
    mark = audit.fingerprint(KEY, "accessor-abc")
    new_style(store, 2)
    new_style(store, 1, "g2", {"identifiers": {"accessor": mark}})
    new_style(store, 1, "g3", {"gone": True, "handle": mark})
    refs = store.db.execute("SELECT fingerprint, seq FROM audit_refs ORDER BY seq").fetchall()
    assert [(r["fingerprint"], r["seq"]) for r in refs] == [(mark, 3), (mark, 4)]
    log = AuditLog(store, KEY)
    assert [(e["seq"], e["grant_id"]) for e in log.lookup("accessor-abc")] == [(3, "g2"), (4, "g3")]
    assert log.lookup("accessor-xyz") == []


@sqlite_only
def test_lookup_reads_the_index_not_the_log(store):
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT a.* FROM audit_refs r JOIN audit a ON a.seq = r.seq "
        "WHERE r.fingerprint = ? ORDER BY r.seq",
        ["x"],
    ).fetchall()
    assert any("idx_audit_refs_fingerprint_seq" in row["detail"] for row in plan), plan


@sqlite_only
def test_a_version_9_file_gets_its_lookup_index_and_verifies_old_and_new(tmp_path):
    mark = audit.fingerprint(KEY, "lease-1")
    store = older_file(tmp_path / "broker.db", 9)
    old_style(store, 2)
    old_style(store, 1, {"lease": mark})
    store.migrate()
    assert [e["seq"] for e in AuditLog(store, KEY).lookup("lease-1")] == [3]
    new_style(store, 2)
    assert AuditLog(store, KEY).verify().ok
    store.close()


def test_the_verified_mark_advances_and_a_tamper_behind_it_is_caught_in_full(store):
    new_style(store, 3, "g1")
    new_style(store, 2, "g2")
    log = AuditLog(store, KEY)
    assert store.verified_mark() == (0, "")
    assert log.timeline("g2").verification.last_seq == 0  # a page load verifies nothing
    assert log.advance(limit=2).ok and store.verified_mark()[0] == 2
    assert log.advance().ok and store.verified_mark() == (5, store.audit_entry(5)["hash"])
    new_style(store, 1, "g2")
    timeline = log.timeline("g2")
    assert timeline.verification.ok and timeline.verification.last_seq == 5
    assert [e["seq"] for e in timeline.entries] == [4, 5, 6]  # 6: checked on its own, not yet
    assert log.advance().ok and log.timeline("g2").verification.last_seq == 6

    # Behind the mark: the background goes on from the mark, `jit audit verify` reads it all.
    store.db.execute("UPDATE audit SET data = ? WHERE seq = 2", ['{"n":7}'])
    assert log.advance().ok and store.verified_mark()[0] == 6
    full = log.verify()
    assert not full.ok and full.bad_seq == 2 and "was edited" in full.problem
    assert not log.timeline("g1").verification.ok  # its own entry 2 is checked on the page

    # The marked entry rewritten: the mark no longer vouches, so all is verified again.
    store.db.execute("UPDATE audit SET hash = ? WHERE seq = 6", ["0" * 64])
    again = log.advance()
    assert not again.ok and again.bad_seq == 2
    assert log.timeline("g2").verification.bad_seq == 2  # the pages show the break found


def walked(store, first_seq=1, first_prev=audit.chain.GENESIS, limit=None, signed=None):
    """`database_walk` as `verify` calls it: a Walk when the database vouches, else None."""
    times: dict = {}
    return database_walk(store, first_seq, first_prev, limit, signed or {}, set(), times, set(), {})


def test_the_database_vouches_for_an_intact_log_old_entries_and_new(store):
    old_style(store, 2)
    new_style(store, 4)
    walk = walked(store)
    assert walk is not None and (walk.checked, walk.last_seq) == (6, 6)
    assert (
        walked(store, first_seq=3, first_prev=store.audit_entry(2)["hash"], limit=2).last_seq == 4
    )
    head = store.audit_entry(6)["hash"]
    assert walked(store, signed={6: head}) is not None
    assert walked(store, first_seq=7, first_prev=head).checked == 0  # nothing after


def swap(store, a, b):
    """Entries a and b change places (their seqs swapped, through a free seq)."""
    store.db.execute("UPDATE audit SET seq = -1 WHERE seq = ?", [a])
    store.db.execute("UPDATE audit SET seq = ? WHERE seq = ?", [a, b])
    store.db.execute("UPDATE audit SET seq = ? WHERE seq = -1", [b])


def insert_copy(store, at_seq):
    """An entry inserted at `at_seq`, the ones from there renumbered up by one."""
    entry = dict(store.db.execute("SELECT * FROM audit WHERE seq = ?", [at_seq]).fetchone())
    top = store.audit_head()["seq"]
    for seq in range(top, at_seq - 1, -1):
        store.db.execute("UPDATE audit SET seq = ? WHERE seq = ?", [seq + 1, seq])
    _insert(store.db, "audit", dict(entry, data='{"n":1000}'))


@pytest.mark.parametrize(
    "tamper, bad_seq",
    [
        (lambda s: s.db.execute("UPDATE audit SET data = '{\"n\":3}' WHERE seq = 4"), 4),
        (
            lambda s: s.db.execute(
                "UPDATE audit SET at = replace(at, '2026', '2027') WHERE seq = 2"
            ),
            2,
        ),
        (lambda s: s.db.execute("UPDATE audit SET hash = ? WHERE seq = 3", ["a" * 64]), 3),
        (lambda s: s.db.execute("UPDATE audit SET prev = ? WHERE seq = 5", ["b" * 64]), 5),
        (lambda s: s.db.execute("DELETE FROM audit WHERE seq = 3"), 3),
        (lambda s: s.db.execute("DELETE FROM audit WHERE seq = 1"), 1),
        (lambda s: insert_copy(s, 3), 3),
        (lambda s: swap(s, 2, 3), 2),
        (lambda s: swap(s, 5, 6), 5),
    ],
    ids=[
        "byte-in-data",
        "byte-in-at",
        "hash",
        "prev",
        "deleted",
        "first-deleted",
        "inserted",
        "swapped",
        "swapped-new",
    ],  # fmt: skip
)
def test_the_database_vouches_for_nothing_tampered_and_verify_names_it(store, tamper, bad_seq):
    """Each kind of change makes the walk in the database give up (so the slow walk names it,
    by seq), on the store under test; entries 1-2 written before schema 10, 3-6 after."""
    old_style(store, 2)
    new_style(store, 4)
    tamper(store)
    assert walked(store) is None
    result = AuditLog(store, KEY).verify()
    assert not result.ok and result.bad_seq == bad_seq, str(result)


def test_the_database_holds_the_first_link_and_the_signed_heads(store):
    new_style(store, 4)
    assert walked(store, first_seq=3, first_prev="c" * 64) is None
    assert walked(store, first_seq=3, first_prev=None) is not None  # a range: any first link
    assert walked(store, signed={2: "d" * 64}) is None
    assert walked(store, limit=3, signed={4: "d" * 64}).last_seq == 3  # beyond: verify's to say


def test_suspects_come_page_by_page_each_linked_to_the_one_before(store, monkeypatch):
    """Entries the database cannot vouch for (old-style JSON) fill several pages: each still
    links to the entry before it across the page boundaries, and a broken link is found on a
    later page."""
    from broker.store import base

    monkeypatch.setattr(base, "AUDIT_PAGE", 3)
    new_style(store, 2)
    old_style(store, 8)
    new_style(store, 2)
    found = list(store.audit_suspects(0, 12))
    assert [seq for seq, *_ in found] == [1, *range(3, 11)]
    assert [(sealed, linked) for _, _, _, sealed, linked in found[1:]] == [(False, True)] * 8
    assert walked(store) is not None and AuditLog(store, KEY).verify().ok
    assert [seq for seq, *_ in store.audit_suspects(4, 12)] == list(range(5, 11))
    store.db.execute("UPDATE audit SET prev = ? WHERE seq = 9", ["b" * 64])
    assert [(seq, linked) for seq, _, _, _, linked in store.audit_suspects(0, 12)][-3:] == [
        (8, True),
        (9, False),
        (10, True),
    ]
    assert walked(store) is None
