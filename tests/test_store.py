"""The store: audit entries appended in the grant's own transaction, the schema version, one schema
and one migration path for SQLite and PostgreSQL, and the migration of databases older brokers
left behind (SQLite files at every earlier version, frozen in tests/old_schemas.py)."""

import sqlite3
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit
from broker.audit.log import AuditLog
from broker.errors import StoreUnavailable
from broker.models import Approval
from broker.store import SCHEMA_VERSION, SqliteStore
from broker.store.base import _insert
from broker.store.schema import MIGRATIONS, SQLITE
from tests.helpers import STORE, sqlite_only
from tests.old_schemas import OLD_SQLITE_SCHEMAS


def test_store_appends_in_the_same_transaction_and_rolls_back_together(make_store):
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        tx.append("t", "first", {}, "g1", {})
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.append("t", "lost", {}, "g1", {})
        raise RuntimeError("crash between two writes")
    assert [e["type"] for e in store.audit_entries()] == ["first"]
    with store.transaction() as tx:
        tx.append("t", "second", {}, "g1", {})
    entries = list(store.audit_entries())
    assert [e["seq"] for e in entries] == [1, 2]
    assert audit.verify(entries).ok


def test_two_brokers_appending_at_once_make_one_chain(make_store):
    """Two brokers' stores on one database, eight threads appending in transactions of their own
    at once: every entry lands once, on one unbroken chain (each transaction seals over the head
    as it is under the write lock, read as it begins on PostgreSQL)."""
    stores = [make_store(), make_store()]
    for store in stores:
        store.migrate()
    start = threading.Barrier(8)

    def write(store, writer):
        start.wait()
        for step in range(25):
            with store.transaction() as tx:
                tx.append("t", "step", {}, f"g{writer}", {"step": step})

    threads = [threading.Thread(target=write, args=(stores[n % 2], n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = list(stores[1].audit_entries())
    assert [entry["seq"] for entry in entries] == list(range(1, 201))
    assert sorted((e["grant_id"], e["data"]["step"]) for e in entries) == sorted(
        (f"g{writer}", step) for writer in range(8) for step in range(25)
    )
    assert audit.verify(entries).ok


def test_a_transaction_reads_its_own_writes_and_a_failing_write_rolls_it_all_back(make_store):
    """Writes nobody reads the answer of wait (on PostgreSQL) for the next statement that needs
    one or for the COMMIT: a read still sees every write before it, and a write that fails
    (here a grant id taken already) fails the transaction, of which nothing is kept."""
    store = make_store()
    store.migrate()
    grant = dict(id="g1", entitlement="kv-read", status="active", window_end="t", duration=60)
    grant.update(created_at="2026-01-01T00:00:00Z", attempts=0, backend="vault_token")
    with store.transaction() as tx:
        insert(tx, "grants", **grant)
        tx.append("t", "request", {}, "g1", {})
        assert tx.get_grant("g1").status == "active"
    with pytest.raises(Exception, match="g1|UNIQUE|unique"), store.transaction() as tx:
        tx.append("t", "lost", {}, "g2", {})
        insert(tx, "grants", **grant)  # the same id again
    assert [entry["type"] for entry in store.audit_entries()] == ["request"]
    with store.transaction() as tx:  # the connection serves the next transaction as before
        tx.append("t", "after", {}, "g1", {})
    assert audit.verify(list(store.audit_entries())).ok


def _writes(store):
    return store.db.execute("SELECT writes FROM write_check").fetchone()["writes"]


@sqlite_only
def test_commits_sync_as_configured_and_make_durable_syncs_one_write_then_restores(tmp_path):
    full = SqliteStore(tmp_path / "full.db", synchronous="full")
    full.migrate()
    assert full.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    full.make_durable()  # every commit is synced already: nothing to do
    assert _writes(full) == 0
    normal = SqliteStore(tmp_path / "normal.db")
    normal.migrate()
    assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, the default
    normal.make_durable()
    assert _writes(normal) == 1  # one write committed with FULL, which syncs the whole WAL
    assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(tmp_path / "x.db", synchronous="off")


def test_a_checkpoint_is_signed_only_over_a_log_made_durable_first(make_store):
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        tx.append("t", "first", {}, "g1", {})
    log = AuditLog(store, b"k" * 32, signer=Ed25519PrivateKey.generate())
    assert log.checkpoint()["size"] == 1
    # SQLite syncs the WAL with one write committed with FULL; a PostgreSQL commit is durable
    # already (synchronous_commit is the server's), so nothing more is written.
    assert _writes(store) == (1 if STORE == "sqlite" else 0)


def test_what_waits_for_a_commit_runs_after_it_and_never_after_a_rollback(make_store):
    store = make_store()
    store.migrate()
    ran = []
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("crash before the commit")
    with store.transaction() as tx:
        tx.after_commit(lambda: ran.append(store.audit_head()["type"]))  # sees the commit
        tx.append("t", "kept", {}, "g1", {})
    assert ran == ["kept"]


def test_schema_version_is_recorded_and_migrate_is_idempotent(make_store):
    store = make_store()
    assert store.schema_version() == 0
    store.migrate()
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION
    if STORE == "sqlite":
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_brokers_migrating_an_empty_database_at_the_same_moment_create_the_schema_once(
    make_store,
):
    """Replicas starting together: each with its own connections (a pool each on PostgreSQL);
    the write lock makes the others wait for the first, then find nothing to do."""
    stores = [make_store() for _ in range(6)]
    start = threading.Barrier(len(stores))
    failures: list[BaseException] = []

    def migrate(store):
        start.wait()
        try:
            store.migrate()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=migrate, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    assert all(store.schema_version() == SCHEMA_VERSION for store in stores)
    assert _writes(stores[0]) == 0  # write_check's one row, inserted once
    rows = stores[0].db.execute("SELECT count(*) AS n FROM write_check").fetchone()
    assert rows["n"] == 1


def insert(tx, table: str, **row) -> None:
    _insert(tx.db, table, row)


def migrated_to(store, version: int) -> None:
    """The store as this broker's own migrations leave it at `version`."""
    with store.transaction() as tx:
        if STORE == "postgres":
            from broker.store.schema import POSTGRES

            tx.db.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
            tx.db.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
            dialect = POSTGRES
        else:
            tx.db.execute(f"PRAGMA user_version = {version}")
            dialect = SQLITE
        for step in MIGRATIONS[:version]:
            for statement in step.sql(dialect):
                tx.db.execute(statement)


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_a_database_at_any_earlier_version_is_upgraded_with_every_row(make_store, version):
    """One migration path for both stores: stopped at `version`, with that version's rows, then
    upgraded by migrate(); every row is there after, with the new columns' defaults."""
    store = make_store()
    migrated_to(store, version)
    with store.transaction() as tx:
        grant = dict(id="g1", entitlement="kv-read", status="revoked", window_end="t")
        grant.update(created_at="2026-01-01T00:00:00Z")
        insert(tx, "grants", **grant, duration=60, attempts=0, backend="vault_token", handle="h1")
        tx.append("2026-01-01T00:00:00Z", "request", {"iss": "i", "sub": "s"}, "g1", {})
        if version >= 2:
            approval = dict(grant_id="g1", issuer="i", subject="s", display="d", groups="[]")
            insert(tx, "approvals", **approval, at="t")
    assert store.schema_version() == version
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION
    migrated = store.get_grant("g1")
    assert (migrated.status, migrated.break_glass, migrated.task_agent) == ("revoked", 0, "")
    assert migrated.window_end == "t" and migrated.due_at in ("", None)
    assert audit.verify(store.audit_entries()).ok
    if version >= 2:
        assert [a.subject for a in store.approvals_of("g1")] == ["s"]
    if version < 4:  # schema 4 lists the one credential a grant held before
        (held,) = store.credentials_of("g1")
        assert (held.handle, held.backend) == ("h1", "vault_token")
    assert store.checkpoints() == [] and store.cursor("forward") == 0


# --- SQLite files exactly as older brokers left them ---------------------------------------------


def older_file(path, version: int) -> SqliteStore:
    """A SQLite file as a broker of schema `version` left it (sqlite-utils made its tables)."""
    with sqlite3.connect(path) as db:
        for statement in OLD_SQLITE_SCHEMAS[version]:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {version}")
    return SqliteStore(path)


@sqlite_only
def test_a_fresh_database_has_the_schema_an_upgraded_older_file_has(tmp_path):
    """The portable migrations make what sqlite-utils made: the same columns (names, types,
    defaults, NOT NULL) and the same indexes, so files old and new are one schema."""

    def schema(store):
        db = store.db
        tables = [
            row["name"]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        columns = {
            table: sorted(
                (row["name"], row["type"], row["notnull"], row["dflt_value"], row["pk"])
                for row in db.execute(f"PRAGMA table_info({table})")
            )
            for table in tables
        }
        indexes = sorted(
            (row["name"], row["tbl_name"])
            for row in db.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")
            if not row["name"].startswith("sqlite_autoindex")
        )
        return columns, indexes

    fresh = SqliteStore(tmp_path / "fresh.db")
    fresh.migrate()
    for version in range(1, SCHEMA_VERSION + 1):
        old = older_file(tmp_path / f"v{version}.db", version)
        old.migrate()
        assert schema(old) == schema(fresh), version


@sqlite_only
def test_a_version_2_database_is_read_as_it_is_and_upgraded_with_its_grants(tmp_path):
    """A database from the broker before signed checkpoints and break-glass: `jit audit` reads
    it without upgrading it; the broker's migrate() then adds the new columns and tables."""
    from click.testing import CliRunner

    from broker.cli import main as jit

    store = older_file(tmp_path / "broker.db", 2)
    with store.transaction() as tx:
        insert(
            tx,
            "grants",
            id="g1",
            entitlement="kv-read",
            status="revoked",
            window_end="t",
            duration=60,
            attempts=0,
        )
        tx.append("2026-01-01T00:00:00Z", "request", {"iss": "i", "sub": "s"}, "g1", {})
    result = CliRunner().invoke(jit, ["audit", "verify"], env={"JIT_STORAGE_PATH": str(store.path)})
    # Read, not upgraded: the chain holds, but nothing ever signed it (issue 17: absence is
    # evidence), and its hand-made row is not what its one entry says.
    assert result.exit_code == 1, result.output
    assert result.output.startswith("FAILED at seq 1: entries 1 to 1 are not covered by a signed")
    assert "grant g1: status is revoked, but its chain records no issue" in result.output
    assert store.schema_version() == 2

    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION
    grant = store.get_grant("g1")
    assert (grant.status, grant.break_glass, grant.review_due) == ("revoked", 0, "")
    assert store.checkpoints() == [] and store.cursor("forward") == 0
    assert audit.verify(store.audit_entries()).ok


@sqlite_only
def test_a_version_3_database_gets_empty_verified_emails(tmp_path):
    """Schema v4 adds the requester's and approvers' verified emails; grants and approvals from
    before have none ("": matched by issuer and subject only)."""
    store = older_file(tmp_path / "broker.db", 3)
    with store.transaction() as tx:
        grant = {"id": "g1", "entitlement": "db", "status": "pending", "window_end": ""}
        insert(tx, "grants", **grant, duration=60, attempts=0)
        insert(
            tx,
            "approvals",
            grant_id="g1",
            issuer="i",
            subject="s",
            display="d",
            groups="[]",
            at="t",
        )
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION == 10
    assert store.get_grant("g1").requester_email == ""
    assert store.approvals_of("g1") == [Approval("i", "s", "d", (), "t", email="")]


@sqlite_only
def test_a_version_3_database_lists_each_grants_credential(tmp_path):
    """Schema v4 lists every credential a grant held (issue 10, item 1): a grant from before
    holds its one handle, already gone if the grant was revoked."""
    store = older_file(tmp_path / "broker.db", 3)
    with store.transaction() as tx:
        for grant_id, status, handle in (
            ("live", "active", "acc-live"),
            ("done", "revoked", "acc-done"),
            ("never", "denied", ""),
        ):
            insert(
                tx,
                "grants",
                id=grant_id,
                entitlement="kv-read",
                status=status,
                backend="vault_token",
                handle=handle,
                window_start="2026-01-01T00:00:00Z",
                window_end="2026-01-01T01:00:00Z",
                updated_at="2026-01-01T00:30:00Z",
                duration=3600,
                attempts=0,
            )
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION == 10
    (live,) = store.credentials_of("live")
    assert (live.handle, live.backend, live.gone_at) == ("acc-live", "vault_token", "")
    assert live.issuing_process == ""  # no process known: judged by the grace period
    (done,) = store.credentials_of("done")
    assert (done.handle, done.gone_at) == ("acc-done", "2026-01-01T00:30:00Z")
    assert store.credentials_of("never") == []


@sqlite_only
@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_an_older_file_at_any_version_keeps_every_row(tmp_path, version):
    store = older_file(tmp_path / "broker.db", version)
    with store.transaction() as tx:
        for i in range(3):
            insert(
                tx,
                "grants",
                id=f"g{i}",
                entitlement="kv-read",
                status="active",
                window_end="2026-01-01T01:00:00Z",
                duration=60,
                attempts=0,
                handle=f"h{i}",
                backend="vault_token",
                created_at="2026-01-01T00:00:00Z",
            )
            tx.append("2026-01-01T00:00:00Z", "issue", {"iss": "i", "sub": "s"}, f"g{i}", {})
    store.migrate()
    assert [store.get_grant(f"g{i}").handle for i in range(3)] == ["h0", "h1", "h2"]
    assert len(list(store.audit_entries())) == 3 and audit.verify(store.audit_entries()).ok


def test_audit_entries_are_read_in_pages_and_limits_hold_across_them(make_store, monkeypatch):
    from broker.store import base

    monkeypatch.setattr(base, "AUDIT_PAGE", 3)
    store = make_store()
    store.migrate()
    with store.transaction() as tx:
        for n in range(10):
            tx.append("t", "step", {}, "g1" if n % 2 else "g2", {"n": n})
    assert [e["seq"] for e in store.audit_entries()] == list(range(1, 11))
    assert [e["seq"] for e in store.audit_entries(after=2, limit=7)] == list(range(3, 10))
    assert [e["seq"] for e in store.audit_entries("g1")] == [2, 4, 6, 8, 10]
    assert [e["seq"] for e in store.audit_entries("g2", after=3, limit=2)] == [5, 7]
    assert list(store.audit_entries(after=10)) == [] and list(store.audit_entries(limit=0)) == []


@sqlite_only
def test_writers_of_one_process_queue_for_the_sqlite_lock_and_all_commit(tmp_path):
    """Issue 15: 32 threads writing at once each get the write lock in turn (an in-process
    queue before BEGIN IMMEDIATE, not SQLite's busy handler polling), every append lands, and
    the chain is one unbroken line."""
    store = SqliteStore(tmp_path / "queue.db", timeout=30)
    store.migrate()
    failures: list[BaseException] = []
    start = threading.Barrier(32)

    def write(n):
        start.wait()
        try:
            for i in range(10):
                with store.transaction() as tx:
                    tx.append("t", "write", {}, f"g{n}", {"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    entries = list(store.audit_entries())
    assert [e["seq"] for e in entries] == list(range(1, 321))
    assert audit.verify(entries).ok


@sqlite_only
def test_a_writer_held_past_the_timeout_is_refused_and_a_nested_one_fails_at_once(tmp_path):
    """The in-process queue keeps SQLite's answers: a writer kept waiting past the busy timeout
    gets StoreUnavailable (a 503), and a transaction opened inside another one on the same
    thread is SQLite's error at once, never a wait on itself."""
    store = SqliteStore(tmp_path / "held.db", timeout=0.2)
    store.migrate()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with store.transaction():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(10)
    try:
        with pytest.raises(StoreUnavailable, match="locked"), store.transaction():
            pass
    finally:
        release.set()
        holder.join()
    with store.transaction(), pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        with store.transaction():
            pass
    with store.transaction() as tx:  # the lock was given back each time
        tx.append("t", "after", {}, None, {})
