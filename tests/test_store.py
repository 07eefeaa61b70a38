"""The store: audit entries appended in the grant's own transaction, the schema version, and the
migration of databases older brokers left behind."""

from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit
from broker.audit.log import AuditLog
from broker.store import SCHEMA_VERSION, Store, _create_v1, _migrate_v2, _migrate_v3


def test_store_appends_in_the_same_transaction_and_rolls_back_together(tmp_path):
    store = Store(tmp_path / "broker.db")
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


def _writes(store):
    return store.db.execute("SELECT writes FROM write_check").fetchone()[0]


def test_commits_sync_as_configured_and_make_durable_syncs_one_write_then_restores(tmp_path):
    full = Store(tmp_path / "full.db", synchronous="full")
    full.migrate()
    assert full.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    full.make_durable()  # every commit is synced already: nothing to do
    assert _writes(full) == 0
    normal = Store(tmp_path / "normal.db")
    normal.migrate()
    assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, the default
    normal.make_durable()
    assert _writes(normal) == 1  # one write committed with FULL, which syncs the whole WAL
    assert normal.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError, match="synchronous"):
        Store(tmp_path / "x.db", synchronous="off")


def test_a_checkpoint_is_signed_only_over_a_log_made_durable_first(tmp_path):
    store = Store(tmp_path / "broker.db")
    store.migrate()
    with store.transaction() as tx:
        tx.append("t", "first", {}, "g1", {})
    log = AuditLog(store, b"k" * 32, signer=Ed25519PrivateKey.generate())
    assert log.checkpoint()["size"] == 1
    assert _writes(store) == 1


def test_what_waits_for_a_commit_runs_after_it_and_never_after_a_rollback(tmp_path):
    store = Store(tmp_path / "broker.db")
    store.migrate()
    ran = []
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("crash before the commit")
    with store.transaction() as tx:
        tx.after_commit(lambda: ran.append(store.audit_head()["type"]))  # sees the commit
        tx.append("t", "kept", {}, "g1", {})
    assert ran == ["kept"]


def test_schema_version_is_recorded_and_migrate_is_idempotent(tmp_path):
    store = Store(tmp_path / "broker.db")
    store.migrate()
    store.migrate()
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@contextmanager
def older_store(path, version: int):
    """A database as a broker of schema `version` left it: (the store, the open transaction in
    which the with-body writes that broker's rows)."""
    store = Store(path)
    with store.transaction() as tx:
        for step in (_create_v1, _migrate_v2, _migrate_v3)[:version]:
            step(tx.db)
        tx.db.execute(f"PRAGMA user_version = {version}")
        yield store, tx


def test_a_version_2_database_is_read_as_it_is_and_upgraded_with_its_grants(tmp_path):
    """A database from the broker before signed checkpoints and break-glass: `jit audit` reads
    it without upgrading it; the broker's migrate() then adds the new columns and tables."""
    from click.testing import CliRunner

    from broker.cli import main as jit

    with older_store(tmp_path / "broker.db", 2) as (store, tx):
        tx.db["grants"].insert(
            {
                "id": "g1",
                "entitlement": "kv-read",
                "status": "revoked",
                "window_end": "t",
                "duration": 60,
                "attempts": 0,
            }  # fmt: skip
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


def test_a_version_3_database_gets_empty_verified_emails(tmp_path):
    """Schema v4 adds the requester's and approvers' verified emails; grants and approvals from
    before have none ("": matched by issuer and subject only)."""
    from broker.models import Approval

    with older_store(tmp_path / "broker.db", 3) as (store, tx):
        grant = {"id": "g1", "entitlement": "db", "status": "pending", "window_end": ""}
        tx.db["grants"].insert(dict(grant, duration=60, attempts=0))
        tx.db["approvals"].insert(
            {
                "grant_id": "g1",
                "issuer": "i",
                "subject": "s",
                "display": "d",
                "groups": "[]",
                "at": "t",
            }  # fmt: skip
        )
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION == 8
    assert store.get_grant("g1").requester_email == ""
    assert store.approvals_of("g1") == [Approval("i", "s", "d", (), "t", email="")]


def test_a_version_3_database_lists_each_grants_credential(tmp_path):
    """Schema v4 lists every credential a grant held (issue 10, item 1): a grant from before
    holds its one handle, already gone if the grant was revoked."""
    with older_store(tmp_path / "broker.db", 3) as (store, tx):
        for grant_id, status, handle in (
            ("live", "active", "acc-live"),
            ("done", "revoked", "acc-done"),
            ("never", "denied", ""),
        ):
            tx.db["grants"].insert(
                {
                    "id": grant_id,
                    "entitlement": "kv-read",
                    "status": status,
                    "backend": "vault_token",
                    "handle": handle,
                    "window_start": "2026-01-01T00:00:00Z",
                    "window_end": "2026-01-01T01:00:00Z",
                    "updated_at": "2026-01-01T00:30:00Z",
                    "duration": 3600,
                    "attempts": 0,
                }
            )
    store.migrate()
    assert store.schema_version() == SCHEMA_VERSION == 8
    (live,) = store.credentials_of("live")
    assert (live.handle, live.backend, live.gone_at) == ("acc-live", "vault_token", "")
    assert live.issuing_process == ""  # no process known: judged by the grace period
    (done,) = store.credentials_of("done")
    assert (done.handle, done.gone_at) == ("acc-done", "2026-01-01T00:30:00Z")
    assert store.credentials_of("never") == []
