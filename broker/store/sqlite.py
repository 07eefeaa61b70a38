"""The embedded store: one SQLite file in WAL mode, for one machine. One connection per thread;
BEGIN IMMEDIATE is the write lock every transaction takes first, which is also what serialises
several broker processes on one file. SQLite's failures become `StoreUnavailable` here, at the
connection, so every path (reads included) answers 503 rather than an unexplained 500. A file on
a network filesystem is not supported: WAL needs shared memory on one host."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar, overload

import sqlite_utils

from ..config import SYNCHRONOUS
from ..errors import StoreUnavailable
from ..liveness import FileLeadership, Liveness
from . import schema
from .base import REFS_SINCE, Store, Transaction, fill_audit_refs
from .grant_chains import SEQ_WIDTH, ChainSql

# SQLite's primary result codes that mean "the database cannot be used now" rather than "the
# broker's SQL is wrong": busy/locked past the timeout, out of memory, read-only, I/O error,
# corrupt, full, cannot open, lock protocol, not a database, no permission.
UNAVAILABLE_CODES = frozenset({3, 5, 6, 7, 8, 10, 11, 13, 14, 15, 26})


def _unavailable(exc: sqlite3.Error) -> StoreUnavailable | None:
    """The broker error for `exc` when it means the store cannot be used now; None for the
    errors that are the broker's own bugs (bad SQL, a broken constraint), which stay 500s."""
    if not isinstance(exc, sqlite3.OperationalError) and type(exc) is not sqlite3.DatabaseError:
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF not in UNAVAILABLE_CODES:
        return None
    name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    return StoreUnavailable(f"the broker's database cannot be used now: {exc} ({name})")


@contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        unavailable = _unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


class _Cursor(sqlite3.Cursor):
    """Rows are read lazily, so a failing read can surface while iterating: translated too."""

    # The arguments pass through unchanged: sqlite3.Cursor's own signature types them.
    def execute(self, *args: Any) -> Self:
        with _translated():
            return super().execute(*args)

    def executemany(self, *args: Any) -> Self:
        with _translated():
            return super().executemany(*args)

    def fetchone(self) -> Any:
        with _translated():
            return super().fetchone()

    def fetchmany(self, *args: Any) -> list[Any]:
        with _translated():
            return super().fetchmany(*args)

    def fetchall(self) -> list[Any]:
        with _translated():
            return super().fetchall()

    def __next__(self) -> Any:
        with _translated():
            return super().__next__()


_CursorT = TypeVar("_CursorT", bound=sqlite3.Cursor)


class _Connection(sqlite3.Connection):
    """The one boundary where SQLite failures become broker errors: every statement of the
    store (and of sqlite-utils on its behalf) runs through here, so a full disk, a read-only
    file, an I/O error or a lock held past the timeout is a `StoreUnavailable` (503) on every
    path, reads included, instead of an unexplained 500."""

    @overload
    def cursor(self, factory: None = None) -> sqlite3.Cursor: ...
    @overload
    def cursor(self, factory: Callable[[sqlite3.Connection], _CursorT]) -> _CursorT: ...
    def cursor(
        self, factory: Callable[[sqlite3.Connection], sqlite3.Cursor] | None = _Cursor
    ) -> sqlite3.Cursor:
        return super().cursor(factory)

    # The arguments pass through unchanged: sqlite3.Connection's own signature types them.
    def execute(self, *args: Any) -> sqlite3.Cursor:
        with _translated():
            return super().execute(*args)

    def executemany(self, *args: Any) -> sqlite3.Cursor:
        with _translated():
            return super().executemany(*args)

    def executescript(self, *args: Any) -> sqlite3.Cursor:
        with _translated():
            return super().executescript(*args)

    def commit(self) -> None:
        with _translated():
            return super().commit()


def _unsure(column: str, keys: tuple[str, ...]) -> str:
    """Whether SQLite may read a JSON text otherwise than Python's json.loads: not RFC 8259
    (json_valid; SQLite 3.42 and later read JSON5 too), a NUL (SQLite stops at it, Python
    refuses it), any escape (a key SQLite would not match unescaped), or a key read written
    twice (SQLite takes the first, Python the last). None of them in what the broker writes."""
    twice = " OR ".join(f'{column} GLOB \'*"{key}"*"{key}"*\'' for key in keys)
    return (
        f"({column} IS NOT NULL AND (NOT json_valid({column}) OR instr({column}, char(92)) > 0 "
        f"OR instr({column}, char(0)) > 0 OR {twice}))"
    )


# SQLite's side of the state check in SQL (grant_chains.py): JSON read by json_extract and
# json_type (their parse of one text shared), values made latest-first sortable by printf.
CHAIN_SQL = ChainSql(
    source="audit",
    text="json_extract({json}, '$.{key}')",
    not_text="json_type({json}, '$.{key}') <> 'text'",
    true="json_type({json}, '$.{key}') = 'true'",
    unsure=_unsure,
    latest=f"printf('%0{SEQ_WIDTH}d', {{seq}}) || {{value}}",
    largest="MAX({})",
)


class SqliteStore(Store):
    """One SQLite file; one connection per thread (the web server's and the reaper's).

    `synchronous` is SQLite's durability setting for the WAL. "normal" (the default): a
    committed transaction survives the broker's crash (kill -9) but may roll back if the machine
    loses power before the next sync; "full" syncs at every commit (about 0.15 ms each here).
    Whatever leaves the machine on the strength of the log (a signed checkpoint, an entry sent
    to the SIEM) is made durable first (`make_durable`), so no witness holds what a power loss
    could take back."""

    def __init__(self, path: Path | str, timeout: float = 30, synchronous: str = "normal"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = Path(path)
        self.timeout = timeout  # seconds to wait for another writer's lock before giving up
        self.synchronous = synchronous
        self._local = threading.local()
        # This process's writers queue here before BEGIN IMMEDIATE (see `transaction`).
        self._writer = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _translated():
                conn = sqlite3.connect(
                    self.path, isolation_level=None, timeout=self.timeout, factory=_Connection
                )
            conn.row_factory = sqlite3.Row
            conn.create_function("jit_sha256", 1, _sha256_hex, deterministic=True)
            self._use_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    CHAIN_SQL = CHAIN_SQL

    def json_refused(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "JSON" in str(exc)

    def tuples(self, sql: str, params: list[object]) -> list[tuple]:
        cursor = self.db.conn.cursor()  # a _Cursor: its failures are translated
        cursor.row_factory = None  # plain tuples, not sqlite3.Row
        return cursor.execute(sql, params).fetchall()

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (it stays so). On a new file that another broker is opening at
        the same moment, SQLite answers SQLITE_BUSY at once rather than waiting out the busy
        timeout: so wait here, as long as that timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except StoreUnavailable as exc:
                busy = isinstance(exc.__cause__, sqlite3.OperationalError) and (
                    getattr(exc.__cause__, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                )
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def migrate(self) -> None:
        """Create or upgrade the schema; `PRAGMA user_version` says which version the file has.
        BEGIN IMMEDIATE: a second broker starting at the same moment waits, then finds it done."""
        with self.transaction() as tx:
            version = self.schema_version()
            for statement in schema.pending(version, schema.SQLITE):
                tx.db.execute(statement)
            if 0 < version < REFS_SINCE:
                fill_audit_refs(tx.db)
            tx.db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """BEGIN IMMEDIATE takes the write lock up front, so the audit chain's head cannot move
        between reading it and appending to it. The threads of this process first queue on an
        in-process lock: blocked on it, a writer wakes the moment the one before commits, where
        SQLite's busy handler would have it poll and sleep (up to 100 ms a turn: the tail at
        many clients). Other processes on the file still meet at BEGIN IMMEDIATE's busy wait."""
        db = self.db
        with self._queued():
            db.execute("BEGIN IMMEDIATE")
            tx = Transaction(db)
            try:
                yield tx
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        for call in tx.committed:
            call()

    @contextmanager
    def _queued(self) -> Iterator[None]:
        """Hold this process's writer lock, waiting at most the busy timeout. A thread already
        inside a transaction goes straight on, for SQLite to refuse the nested BEGIN as before."""
        if getattr(self._local, "writing", False):
            yield
            return
        if not self._writer.acquire(timeout=self.timeout):
            raise StoreUnavailable(
                "the broker's database cannot be used now: another writer of this process held "
                f"it for over {self.timeout:g}s (database is locked)"
            )
        self._local.writing = True
        try:
            yield
        finally:
            self._local.writing = False
            self._writer.release()

    def check_writable(self) -> None:
        """Raise unless a write can be committed now. It commits one: beginning a transaction
        and rolling it back writes nothing, so a full disk or a read-only file would pass."""
        with self.transaction() as tx:
            tx.db.execute(
                "UPDATE write_check SET writes = writes + 1, at = strftime('%Y-%m-%dT%H:%M:%fZ')"
            )

    def make_durable(self) -> None:
        """Sync every transaction committed so far to disk: one small write committed with
        synchronous=FULL syncs the whole write-ahead log, earlier commits included."""
        if self.synchronous == "full":
            return
        db = self.db
        db.execute("PRAGMA synchronous = FULL")
        try:
            self.check_writable()
        finally:
            db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def leadership(self, job: str) -> FileLeadership:
        """A lock file beside the database: every process sharing it shares this host."""
        return FileLeadership(self.path.with_name(f"{self.path.name}-lead-{job}"))

    def processes(self) -> Liveness:
        """Processes on one SQLite file share its host: a lock file each, beside it."""
        return Liveness.beside(self.path)


def _sha256_hex(content: bytes | None) -> str | None:
    """SQLite's `jit_sha256(blob)` (Store.HASH): verification hashes each stored line inside
    the database, so an intact log's rows never travel through the driver one by one."""
    return None if content is None else hashlib.sha256(content).hexdigest()


def _rollback(db: sqlite_utils.Database) -> None:
    """Roll back what is still open. SQLite has already rolled back by itself after some
    failures (a full disk at COMMIT), and a second error must not hide the first."""
    if db.conn.in_transaction:
        try:
            db.execute("ROLLBACK")
        except StoreUnavailable:
            pass
