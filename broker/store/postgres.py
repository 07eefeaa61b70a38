"""The store for several broker replicas: one PostgreSQL database, reached through a psycopg
connection pool. Every write transaction first takes one transaction-level advisory lock (the
write lock), as SQLite's BEGIN IMMEDIATE does: what a transaction reads still holds when it writes,
so the conditional moves of `grants/` stay exactly as safe, a migration runs once however many
replicas start together, and the audit chain has one head (its `seq` is the primary key besides).
Deadlines come from the database's clock, so every replica agrees on what is due. A change on one
replica wakes the others' reapers through LISTEN/NOTIFY, and each replica holds a session advisory
lock for as long as it lives (`Processes`). Connection failures become `StoreUnavailable` here."""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import dict_row

from ..errors import InvalidRequest, StoreUnavailable
from ..models import isoformat, utcnow
from . import schema
from .base import HEAD, REFS_SINCE, Store, Transaction, fill_audit_refs
from .grant_chains import SEQ_WIDTH, ChainSql

log = logging.getLogger(__name__)

# Advisory lock keys (64-bit, the broker's own): the write lock every write transaction takes,
# and the class of the locks that say "this broker process is alive".
WRITE_LOCK = 0x6A69_7462_726B_0001  # "jitbrk" 1
LIVENESS_CLASS = 0x6A69_7401  # the high 32 bits of a process's liveness key
LEADER_CLASS = 0x6A69_7402  # and of a job's leadership (one replica forwards the audit log)
# BEGIN and the write lock (the key is the broker's own); then the chain's head too.
BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"
BEGIN_LOCKED_HEAD = f"{BEGIN_LOCKED}; {HEAD}"
CHANNEL = "jit_broker_wake"  # NOTIFY channel: deadlines changed on some replica
# A replica stopped (SIGSTOP, a pause) inside a transaction must not hold the write lock for
# ever: the server ends such a session, its transaction rolls back and the lock is free.
IDLE_IN_TRANSACTION = "10s"
CLOCK_RESYNC = 5.0  # seconds between reads of the server's clock (now())
DOWN_FOR, DOWN_WAIT = 1.0, 0.25  # seconds the server counts as down after a failure; wait then
# SQLSTATE classes that mean "the database cannot be used now", not "the broker's SQL is wrong":
# connection exception, insufficient resources, operator intervention (shutdown, cancel), system
# error.
UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
# A read-only transaction, a session ended for idling in its transaction (a paused replica), a
# lock not had within lock_timeout.
UNAVAILABLE_STATES = frozenset({"25006", "25P03", "55P03"})


def _unavailable(exc: psycopg.Error) -> StoreUnavailable | None:
    """The broker error for `exc` when it means the store cannot be used now; None for the
    broker's own bugs (bad SQL, a broken constraint), which stay 500s. An error the server sent
    is judged by its SQLSTATE; one without (a lost connection, no connection in time from the
    pool) is the client's own report that the server cannot be reached."""
    state = exc.sqlstate
    if state:
        if state[:2] not in UNAVAILABLE_CLASSES and state not in UNAVAILABLE_STATES:
            return None
    elif not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return None
    text = str(exc).strip()
    detail = text.splitlines()[0] if text else type(exc).__name__
    return StoreUnavailable(
        f"the broker's database cannot be used now: {detail} ({state or type(exc).__name__})"
    )


@functools.lru_cache(maxsize=512)
def _native(statement: str) -> str:
    """The shared SQL (`?` marks) in psycopg's own parameter style (`%s`); the values still go
    as parameters, never into the text. The store's SQL has no `%` of its own."""
    if "%" in statement:
        raise ValueError("a store statement may not contain '%'")
    return statement.replace("?", "%s")


def _params(values: Any) -> Sequence[object]:
    """SQLite reads True as 1; PostgreSQL's integer columns refuse a boolean. PostgreSQL's text
    cannot hold NUL, so no stored value has one: a text with NUL came from outside (a path, a
    claim) and is refused as a bad request, as it would never match, rather than a 500."""
    params = []
    for value in values or ():
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, str) and "\x00" in value:
            raise InvalidRequest("text with a NUL character")
        params.append(value)
    return params


def _rollback(conn: psycopg.Connection) -> None:
    """Roll back what is still open (psycopg sends ROLLBACK only then); a connection already
    broken goes back to the pool as it is (the pool discards it), and a second error must not
    hide the first."""
    try:
        conn.rollback()
    except psycopg.Error:
        pass


class _Result:
    """The rows of one statement run on a connection that has gone back to the pool."""

    def __init__(self, rows: list[dict], rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> dict | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[dict]:
        return self._rows

    def __iter__(self) -> Iterator[dict]:
        return iter(self._rows)


class _Connection:
    """One connection of the pool, held by a transaction: statements in the shared dialect.
    A write whose answer nobody reads (`write_later`: an INSERT of an audit entry, a grant, a
    credential) waits for the next statement that needs one, or for the COMMIT, and goes with
    it in one pipeline: one round trip for them all. In order, so every read sees every write
    before it; a failing write fails that statement or the COMMIT, and the transaction rolls
    back whole."""

    def __init__(self, store: PostgresStore, conn: psycopg.Connection):
        self._store = store
        self.conn = conn
        self._later: list[tuple[str, list[Sequence[object]]]] = []

    def execute(self, statement: str, parameters: Any = ()) -> psycopg.Cursor:
        with self._store.translated(), self._with_writes():
            return self.conn.execute(_native(statement), _params(parameters))

    def executemany(self, statement: str, rows: Iterable[Any]) -> None:
        """One statement for many rows: psycopg sends them in a pipeline (one round trip, the
        statement parsed once), not a statement and a round trip a row."""
        with self._store.translated(), self._with_writes(), self.conn.cursor() as cursor:
            cursor.executemany(_native(statement), [_params(row) for row in rows])

    def write_later(self, statement: str, rows: list[Any]) -> None:
        self._later.append((_native(statement), [_params(row) for row in rows]))

    def commit(self) -> None:
        with self._store.translated(), self._with_writes():
            self.conn.commit()  # in a pipeline: COMMIT, then its sync

    @contextmanager
    def _with_writes(self) -> Iterator[None]:
        """The writes waiting, then the caller's statement, in one pipeline (its answer read
        when the pipeline ends); straight on when none waits."""
        if not self._later:
            yield
            return
        later, self._later = self._later, []
        with self.conn.cursor() as cursor, self.conn.pipeline():  # the sync before the close
            for statement, rows in later:
                cursor.executemany(statement, rows)
            yield


class _Pooled:
    """What `Store.db` is on PostgreSQL: a statement runs inside the calling thread's open
    transaction (so it sees that transaction's writes, as SQLite's one connection per thread
    does), or else on a connection borrowed from the pool for that one statement."""

    def __init__(self, store: PostgresStore):
        self._store = store

    def execute(self, statement: str, parameters: Any = ()) -> Any:
        held = self._store._held()
        if held is not None:
            return held.execute(statement, parameters)
        with self._store.translated(), self._store._connection() as conn:
            cursor = conn.execute(_native(statement), _params(parameters))
            rows = cast(list[dict], cursor.fetchall()) if cursor.description else []  # dict_row
            return _Result(rows, cursor.rowcount)


# PostgreSQL's side of the state check in SQL (grant_chains.py): each entry's data (and an
# approval's actor) cast to jsonb once (OFFSET 0 keeps the subquery from being inlined into
# every use), read in grant order by the (grant_id, seq) index (no sort of the parsed rows). A
# text that is not JSON raises, and the check falls back to Python. jsonb keeps the last of a
# key written twice and unescapes keys, as json.loads does.
CHAIN_SQL = ChainSql(
    source=(
        "(SELECT seq, grant_id, type, CASE WHEN type IN {kinds} THEN CAST(data AS jsonb) END "
        "AS data, CASE WHEN type = {approval} THEN CAST(actor AS jsonb) END AS actor "
        "FROM audit WHERE grant_id IS NOT NULL ORDER BY grant_id, seq OFFSET 0) audit"
    ),
    text="({json} ->> '{key}')",
    not_text="jsonb_typeof({json} -> '{key}') <> 'string'",
    true="({json} -> '{key}') = 'true'::jsonb",
    unsure=lambda column, keys: "FALSE",
    latest=f"lpad(CAST({{seq}} AS TEXT), {SEQ_WIDTH}, '0') || {{value}}",
    largest='MAX({} COLLATE "C")',
)


class PostgresStore(Store):
    """Any number of broker replicas on one PostgreSQL database (`url`, a libpq URI)."""

    CONTAINS = "strpos(data, ?) > 0"
    QUOTE = "COALESCE(to_json({})::text, 'null')"
    HASH = "encode(sha256(convert_to({}, 'UTF8')), 'hex')"  # built in since PostgreSQL 11

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 30, wait: float = 5):
        self.url = url
        self.pool_size = pool_size
        self.timeout = timeout  # seconds to wait for the write lock (SQLite's busy timeout)
        self.wait = wait  # seconds to wait for a free connection of the pool
        # While the server is known to be out of reach, a request waits only briefly for a
        # connection: a 503 at once, not after `wait`, as the pool reconnects in the background.
        self._down_until = 0.0
        self._clock: tuple[datetime, float] | None = None  # (the server's time, monotonic then)
        self.origin = uuid.uuid4().hex  # this store's announcements, which it does not hear
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        self._local = threading.local()
        self._pooled = _Pooled(self)
        self._closers: list[Callable[[], None]] = []
        # Called by the listener each time it (re)connects: a server restart ends every session,
        # and what a session held (the liveness lock) must be taken again.
        self._on_connect: list[Callable[[], None]] = []
        self._migrated = False  # this store made the schema current: the audit table is there

    def __repr__(self) -> str:
        return "PostgresStore(...)"  # the URL may hold a password

    # --- connections -----------------------------------------------------------------------------

    @property
    def pool(self) -> psycopg_pool.ConnectionPool:
        """Opened when first used, and again after close()."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = psycopg_pool.ConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    kwargs={"autocommit": True, "row_factory": dict_row},
                    configure=self._configure,
                    timeout=self.wait,
                    num_workers=1,
                    name="jit-broker",
                    open=True,
                )
            return self._pool

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
            "set_config('lock_timeout', %s, false)",
            [IDLE_IN_TRANSACTION, f"{int(self.timeout * 1000)}ms"],
        )

    @contextmanager
    def translated(self) -> Iterator[None]:
        """psycopg's failures that mean "unavailable" as StoreUnavailable (503); and after a
        lost connection, the pool's idle connections are checked, so that a restarted server
        costs one failed statement, not one per pooled connection."""
        try:
            yield
        except psycopg.Error as exc:
            unavailable = _unavailable(exc)
            if unavailable is None:
                raise
            if not exc.sqlstate or exc.sqlstate[:2] == "57":  # no server, or it is going away
                self._down_until = time.monotonic() + DOWN_FOR
                if self._pool is not None:
                    try:
                        self._pool.check()
                    except psycopg.Error:
                        pass
            raise unavailable from exc

    def _connection(self) -> AbstractContextManager[psycopg.Connection]:
        """A connection of the pool: waited for `wait` seconds, or briefly while the server is
        known to be down."""
        down = time.monotonic() < self._down_until
        return self.pool.connection(timeout=DOWN_WAIT if down else self.wait)

    def _held(self) -> _Connection | None:
        return getattr(self._local, "tx", None)

    @property
    def db(self) -> Any:
        return self._pooled

    CHAIN_SQL = CHAIN_SQL

    def json_refused(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.DataError)

    def tuples(self, sql: str, params: list[object]) -> list[tuple]:
        return [tuple(row.values()) for row in self.db.execute(sql, params)]  # dict_row: ordered

    def close(self) -> None:
        """Stop listening, give up this process's liveness lock, and close the pool."""
        while self._closers:
            self._closers.pop()()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # --- transactions and the schema -----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """BEGIN, then the write lock (released at COMMIT or ROLLBACK): one writer at a time
        across every replica, as on SQLite, so a transaction's reads still hold when it writes.
        Once this store has migrated the schema, the chain's head is read with them, in the same
        round trip (before, there may be no audit table: it is read at the first append)."""
        if self._held() is not None:
            raise RuntimeError("a store transaction is already open in this thread")
        read_head = self._migrated
        with self.translated(), self._connection() as conn:
            try:
                # BEGIN and the lock (and the head) in one round trip (no parameters: one
                # simple query), where psycopg's conn.transaction() would send BEGIN first.
                began = conn.execute(BEGIN_LOCKED_HEAD if read_head else BEGIN_LOCKED)
                held = self._local.tx = _Connection(self, conn)
                if read_head:
                    while began.nextset():  # to the last statement's rows: the head's
                        pass
                    head = began.fetchone()
                    tx = Transaction(held, dict(head) if head else None)
                else:
                    tx = Transaction(held)
                yield tx
                held.commit()  # sends COMMIT: the server is in the transaction BEGIN opened
            except BaseException:
                _rollback(conn)
                raise
            finally:
                self._local.tx = None
        for call in tx.committed:  # committed: the transaction's block ended without raising
            call()

    def migrate(self) -> None:
        """Create or upgrade the schema in one transaction under the write lock: replicas
        starting together on an empty or old database wait for the first, then find it done."""
        with self.transaction() as tx:
            tx.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            version = self.schema_version()
            statements = schema.pending(version, schema.POSTGRES)
            if statements:  # in one round trip: the statements are the code's own, no parameters
                with self.translated():
                    tx.db.conn.execute(";\n".join(statements))
            if 0 < version < REFS_SINCE:
                fill_audit_refs(tx.db)
            if version != schema.SCHEMA_VERSION:
                tx.db.execute("DELETE FROM schema_version")
                tx.db.execute(
                    "INSERT INTO schema_version (version) VALUES (?)", [schema.SCHEMA_VERSION]
                )
        self._migrated = True

    def schema_version(self) -> int:
        present = self.db.execute(
            "SELECT to_regclass('schema_version') IS NOT NULL AS present"
        ).fetchone()
        if not present["present"]:
            return 0
        row = self.db.execute("SELECT max(version) AS version FROM schema_version").fetchone()
        return int(row["version"] or 0)

    def check_writable(self) -> None:
        """A real commit of one row: the proof that an audit entry could be written now."""
        with self.transaction() as tx:
            tx.db.execute(
                "UPDATE write_check SET writes = writes + 1, at = ?", [isoformat(utcnow())]
            )

    def now(self) -> datetime:
        """The database's clock: every replica decides what is due by the same one. Read from
        the server every CLOCK_RESYNC seconds and carried forward by this process's monotonic
        clock meanwhile (a step of its wall clock changes nothing), so that the many times a
        request asks cost no round trip each."""
        synced = self._clock
        if synced is not None:
            elapsed = time.monotonic() - synced[1]
            if elapsed < CLOCK_RESYNC:
                return synced[0] + timedelta(seconds=elapsed)
        before = time.monotonic()
        row = self.db.execute("SELECT clock_timestamp() AS now").fetchone()
        after = time.monotonic()
        moment: datetime = row["now"].astimezone(UTC)
        # The server read its clock somewhere in the round trip: take the middle.
        self._clock = (moment, (before + after) / 2)
        return moment + timedelta(seconds=after - (before + after) / 2)

    # --- replicas: wake-ups and liveness -------------------------------------------------------

    def announce(self) -> None:
        self.db.execute("SELECT pg_notify(?, ?)", [CHANNEL, self.origin])

    def listen(self, wake: Callable[[], None]) -> Callable[[], None]:
        """A thread on a dedicated connection LISTENing on CHANNEL; it calls `wake` for every
        other replica's announcement, and once after each (re)connection, for whatever was
        announced while it was not listening. Stopping it is a notification of its own."""
        stopping = threading.Event()
        farewell = f"stop:{uuid.uuid4().hex}"
        thread = threading.Thread(
            target=self._listen,
            args=(wake, stopping, farewell),
            name="jit-store-listen",
            daemon=True,
        )
        thread.start()

        def stop() -> None:
            if stopping.is_set():
                return
            stopping.set()
            try:
                self.db.execute("SELECT pg_notify(?, ?)", [CHANNEL, farewell])
            except StoreUnavailable:
                pass  # it sees `stopping` within a second anyway
            thread.join(5)

        self._closers.append(stop)
        return stop

    def _listen(self, wake: Callable[[], None], stopping: threading.Event, farewell: str) -> None:
        pause = 0.5
        while not stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    for renew in self._on_connect:
                        renew()
                    wake()
                    pause = 0.5
                    while not stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload == farewell:
                                return
                            if note.payload != self.origin and not note.payload.startswith("stop:"):
                                wake()
            except (psycopg.Error, StoreUnavailable) as exc:
                log.warning("listening for other replicas failed (%s); again in %.1fs", exc, pause)
                stopping.wait(pause)
                pause = min(pause * 2, 10.0)

    def leadership(self, job: str) -> PostgresLeadership:
        leadership = PostgresLeadership(self, job)
        self._closers.append(leadership.close)
        return leadership

    def processes(self) -> PostgresProcesses:
        """This process's liveness, held for as long as the store is open."""
        processes = PostgresProcesses(self)
        self._closers.append(processes.close)
        self._on_connect.append(processes.renew)
        return processes


class PostgresProcesses:
    """Which broker processes on this database are alive: each holds a session advisory lock
    (LIVENESS_CLASS, its own key) on a connection of its own; the server drops it when the
    process dies, however it dies. Another process reads pg_locks, which never takes the lock.
    A connection lost while the process lives (a server restart) is made again, lock and all."""

    def __init__(self, store: PostgresStore):
        self._store = store
        self.id = uuid.uuid4().hex
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._hold()

    @staticmethod
    def _key(process_id: str) -> int:
        return int(process_id[:7], 16)  # a positive int4

    def _hold(self) -> None:
        with self._lock:
            if self._conn is not None and not self._conn.closed:
                return  # (a connection lost without our noticing: renew() finds it)
            with self._store.translated():
                conn = psycopg.connect(self._store.url, autocommit=True, connect_timeout=10)
                key = [LIVENESS_CLASS, self._key(self.id)]
                conn.execute("SELECT pg_advisory_lock(%s::integer, %s::integer)", key)
            self._conn = conn

    def renew(self) -> None:
        """Take the lock again if the server dropped it with the session (a restart)."""
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error:
                with self._lock:
                    self._conn = None
                conn.close()
        self._hold()

    def is_alive(self, process_id: str) -> bool:
        """False only when the process is certainly gone: no session holds its lock."""
        if process_id == self.id:
            self._hold()  # ours again, should the server have dropped it
            return True
        if len(process_id) != 32 or any(c not in "0123456789abcdef" for c in process_id):
            return False  # not an id any broker ever gave out
        row = self._store.db.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid::bigint = ? AND objid::bigint = ? AND objsubid = 2",
            [LIVENESS_CLASS, self._key(process_id)],
        ).fetchone()
        return bool(row["n"])

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresLeadership:
    """One replica does `job` (the audit forwarder): the one whose connection holds a session
    advisory lock (LEADER_CLASS, the job's key). The server drops it with the session when the
    replica dies, and another's next `holds()` takes it; a holder whose connection was lost
    (a server restart) is no longer the leader until it takes the lock again."""

    def __init__(self, store: PostgresStore, job: str):
        self._store = store
        self._key = [LEADER_CLASS, zlib.crc32(job.encode()) & 0x7FFF_FFFF]
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def holds(self) -> bool:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    self._conn.close()
                    self._conn = None
            try:
                conn = psycopg.connect(self._store.url, autocommit=True, connect_timeout=10)
            except psycopg.Error:
                return False
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s::integer, %s::integer)", self._key
            ).fetchone()
            if row is None or not row[0]:
                conn.close()
                return False
            self._conn = conn
            return True

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
