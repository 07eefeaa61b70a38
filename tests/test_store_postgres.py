"""The PostgreSQL store's own behaviour and faults (the SQLite file's are in test_store_faults.py):
its server going down under a running broker (a 503 with a JSON error, nothing issued in
OpenBao, nothing half-recorded, `/readyz` failing; recovery by itself when it is back, the
reaper included), which of psycopg's errors mean "unavailable", the database's clock, and the
liveness of broker processes held in the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import psycopg_pool
import pytest

from broker import audit
from broker.errors import InvalidRequest, StoreUnavailable
from broker.models import utcnow
from scripts.launchers import Postgres
from tests.helpers import LATER, live_tokens_of, postgres_only, token_works, wait_for_status

pytestmark = postgres_only

ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-14 the database is down"}


@pytest.fixture
def own_postgres():
    """A PostgreSQL cluster of this test's own, to stop and start again."""
    server = Postgres.start()
    yield server
    server.stop()


def accessors(openbao) -> set[str]:
    return set(openbao.client().list("auth/token/accessors")["data"]["keys"])


def test_the_database_down_under_a_running_broker_is_503_and_it_recovers_by_itself(
    make_app, api_for, own_postgres, openbao
):
    app = make_app(storage={"url": own_postgres.dsn}, reaper={"enabled": True})
    jit = app.extensions["jit"]
    api = api_for(app)
    before = api("POST", "/api/v1/requests", ASK)
    assert before.status_code == 201, before.get_json()
    held_before = accessors(openbao)

    own_postgres.halt()
    try:
        started = time.monotonic()
        refused = api("POST", "/api/v1/requests", ASK)
        assert refused.status_code == 503, refused.get_json()
        # Issuing fails closed: its record cannot be committed, so Vault is never asked.
        assert refused.get_json()["error"] == "store_unavailable"
        assert "database cannot be used now" in refused.get_json()["detail"]
        # A write that health does not guard (release is never blocked) is a 503 too.
        release = api("POST", f"/api/v1/requests/{before.get_json()['id']}/release")
        assert release.status_code == 503, release.get_json()
        assert release.get_json()["error"] == "store_unavailable"
        assert api("GET", "/api/v1/requests?mine=1").status_code == 503  # reads too
        health = app.test_client().get("/readyz")  # not ready: the load balancer looks elsewhere
        assert health.status_code == 503 and health.get_json()["status"] == "failing"
        assert "database cannot be used now" in health.get_json()["checks"]["store"]["error"]
        assert time.monotonic() - started < 20  # each answer at once, not after a long wait
        assert accessors(openbao) <= held_before  # nothing issued for a request not recorded
    finally:
        own_postgres.resume()

    deadline = time.monotonic() + 30
    while (answer := api("POST", "/api/v1/requests", ASK)).status_code != 201:
        assert answer.status_code == 503, answer.get_json()
        assert time.monotonic() < deadline, "the broker never recovered"
        time.sleep(0.5)
    rows = jit.grants.store.db.execute("SELECT status, handle FROM grants ORDER BY rowid")
    assert [(row["status"], bool(row["handle"])) for row in rows] == [("active", True)] * 2

    # The restart ended every session, the liveness lock's too: the broker took it again.
    from broker.store.postgres import PostgresStore

    onlooker = PostgresStore(own_postgres.dsn)
    try:
        seen = onlooker.processes()
        deadline = time.monotonic() + 30
        while not seen.is_alive(jit.grants.process_id):
            assert time.monotonic() < deadline, "the broker never took its liveness lock again"
            time.sleep(0.2)
    finally:
        onlooker.close()

    # The refused release left the grant as it was; the reaper went on by itself.
    grant_id = before.get_json()["id"]
    assert jit.grants.store.get_grant(grant_id).status == "active"
    assert token_works(openbao, before.get_json()["credential"]["token"])
    assert api("POST", f"/api/v1/requests/{grant_id}/release").status_code == 200
    wait_for_status(jit.grants, grant_id, "revoked", timeout=30)


def test_only_errors_that_mean_unavailable_become_503():
    from broker.store.postgres import _unavailable

    assert _unavailable(psycopg.OperationalError("server closed the connection")) is not None
    assert _unavailable(psycopg_pool.PoolTimeout("no connection in 5 s")) is not None
    assert _unavailable(psycopg.InterfaceError("the connection is closed")) is not None
    assert _unavailable(psycopg.errors.AdminShutdown("terminating connection")) is not None
    assert _unavailable(psycopg.errors.DiskFull("no space left")) is not None
    assert _unavailable(psycopg.errors.ReadOnlySqlTransaction("read-only")) is not None
    # The broker's own bugs stay plain errors (500s): bad SQL, a broken constraint.
    assert _unavailable(psycopg.errors.UndefinedColumn("no such column")) is None
    assert _unavailable(psycopg.errors.UniqueViolation("duplicate key")) is None
    assert _unavailable(psycopg.errors.SyntaxError("syntax error")) is None


def test_a_server_out_of_reach_is_store_unavailable_and_bad_sql_is_not(make_store, own_postgres):
    from broker.store.postgres import PostgresStore

    store = PostgresStore(own_postgres.dsn, wait=1)
    store.migrate()
    with pytest.raises(psycopg.errors.UndefinedColumn):
        store.db.execute("SELECT no_such_column FROM grants")
    with pytest.raises(InvalidRequest):  # no stored text holds NUL: a 400, never a 500
        store.get_grant("g\x00")
    own_postgres.halt()
    try:
        with pytest.raises(StoreUnavailable) as raised:
            store.get_grant("x")
        assert raised.value.status == 503
        with pytest.raises(StoreUnavailable), store.transaction() as tx:
            tx.append("t", "lost", {}, "g1", {})
    finally:
        own_postgres.resume()
        store.close()


def test_deadlines_are_decided_by_the_databases_clock(make_store, monkeypatch):
    """The server's clock, read once per CLOCK_RESYNC and carried forward by the monotonic clock:
    a replica whose own wall clock is off still decides by the server's."""
    from broker.store import postgres

    store = make_store()
    store.migrate()
    server_now = store.db.execute("SELECT clock_timestamp() AS now").fetchone()["now"]
    first = store.now()
    assert abs((first - server_now).total_seconds()) < 1
    assert first.utcoffset().total_seconds() == 0
    real = time.monotonic
    monkeypatch.setattr(postgres.time, "monotonic", lambda: real() + 3)
    assert 2.5 < (store.now() - first).total_seconds() < 4  # carried forward, no query
    monkeypatch.setattr(postgres.time, "monotonic", lambda: real() + 60)
    again = store.now()  # past CLOCK_RESYNC: read from the server again
    server_now = store.db.execute("SELECT clock_timestamp() AS now").fetchone()["now"]
    assert abs((again - server_now).total_seconds()) < 1


KILLED_BROKER = """
import os, signal, sys
from broker.store.postgres import PostgresStore

store = PostgresStore(sys.argv[1])
processes = store.processes()
print(processes.id, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_broker_process_is_alive_while_it_runs_and_dead_once_killed(make_store):
    """Liveness held in the database (a session advisory lock per process), so replicas on other
    machines see it too; the server drops it the moment the process dies, even by SIGKILL."""
    store = make_store()
    store.migrate()
    mine = store.processes()
    other = subprocess.Popen(
        [sys.executable, "-c", KILLED_BROKER, store.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        other_id = other.stdout.readline().strip()
        assert len(other_id) == 32, other.stderr.read()
        assert mine.is_alive(mine.id) and mine.is_alive(other_id)
        other.stdin.write("die\n")
        other.stdin.flush()
        other.wait(30)
    finally:
        if other.poll() is None:
            other.kill()
    deadline = time.monotonic() + 10
    while mine.is_alive(other_id):
        assert time.monotonic() < deadline, "a killed process still looks alive"
        time.sleep(0.1)
    assert not mine.is_alive("not-an-id") and not mine.is_alive("0" * 32)


STOPPED_IN_A_TRANSACTION = """
import sys
from broker.store.postgres import PostgresStore

store = PostgresStore(sys.argv[1])
try:
    with store.transaction() as tx:
        tx.append("2026-01-01T00:00:00Z", "half", {}, "g1", {})
        print("holding the write lock", flush=True)
        sys.stdin.readline()  # SIGSTOP lands here
    print("committed", flush=True)
except Exception as exc:
    print(type(exc).__name__, flush=True)
"""


def test_a_replica_stopped_inside_a_transaction_holds_the_others_up_only_briefly(make_store):
    """A replica SIGSTOPped while it holds the write lock: the server ends its session once it
    has idled in its transaction for IDLE_IN_TRANSACTION, so the lock is free and the others
    write; resumed, its transaction is gone and nothing of it was recorded."""
    from broker.store.postgres import IDLE_IN_TRANSACTION

    store = make_store()
    store.migrate()
    stopped = subprocess.Popen(
        [sys.executable, "-c", STOPPED_IN_A_TRANSACTION, store.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert stopped.stdout.readline().strip() == "holding the write lock", stopped.stderr.read()
        os.kill(stopped.pid, signal.SIGSTOP)
        started = time.monotonic()
        with store.transaction() as tx:  # waits for the lock, then goes on
            tx.append("2026-01-01T00:00:01Z", "other", {}, "g2", {})
        waited = time.monotonic() - started
        assert waited < int(IDLE_IN_TRANSACTION.removesuffix("s")) + 10, waited
        os.kill(stopped.pid, signal.SIGCONT)
        out, err = stopped.communicate("go on\n", timeout=30)
    finally:
        if stopped.poll() is None:
            os.kill(stopped.pid, signal.SIGCONT)
            stopped.kill()
    assert out.strip() == "StoreUnavailable", (out, err)
    entries = list(store.audit_entries())
    assert [entry["type"] for entry in entries] == ["other"]


def test_a_database_restart_under_load_leaves_nothing_half_recorded(
    make_app, api_for, own_postgres, openbao
):
    """Four clients asking without pause while the server goes down and comes back: each answer
    is a 201 or a 503; once what was in flight at the cut is settled (the reconciler, after the
    grace an issuance in flight gets), every grant is active with a working credential or failed
    with none left in OpenBao, and the chain verifies."""
    app = make_app(storage={"url": own_postgres.dsn})
    jit = app.extensions["jit"]
    answers: list[tuple[int, dict]] = []
    stopping = threading.Event()

    def ask():
        api = api_for(app)
        while not stopping.is_set():
            response = api("POST", "/api/v1/requests", ASK)
            answers.append((response.status_code, response.get_json()))

    clients = [threading.Thread(target=ask) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        time.sleep(1)
        own_postgres.halt()
        time.sleep(1)
    finally:
        own_postgres.resume()
    deadline = time.monotonic() + 30
    served = len(answers)
    while not any(status == 201 for status, _ in answers[served:]):
        assert time.monotonic() < deadline, "no request succeeded after the restart"
        time.sleep(0.2)
    stopping.set()
    for client in clients:
        client.join(60)

    statuses = {status for status, _ in answers}
    assert statuses == {201, 503}, statuses
    jit.grants.reconcile(now=utcnow() + LATER)  # what the cut left `issuing` is settled
    rows = list(jit.grants.store.db.execute("SELECT id, status FROM grants"))
    assert {row["status"] for row in rows} <= {"active", "issue_failed"}
    for status, body in answers:
        if status == 201:
            assert jit.grants.store.get_grant(body["id"]).status == "active"
    for row in rows:
        if row["status"] != "active":
            assert live_tokens_of(openbao, row["id"]) == set(), row
    assert audit.verify(jit.grants.store.audit_entries()).ok
