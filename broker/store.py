"""Persistence in SQLite (WAL) through sqlite-utils: the grants table and the audit chain, always
written together in one transaction. Knows rows, not rules."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Self, TypeVar, Unpack, overload

import sqlite_utils

from . import audit
from .audit.storage import GrantFilters
from .config import SYNCHRONOUS
from .errors import StoreUnavailable
from .models import Approval, Credential, Grant

SCHEMA_VERSION = 8
GRANT_COLUMNS = [f.name for f in fields(Grant)]
V1_GRANT_COLUMNS = [
    "id",
    "requester_iss",
    "requester_sub",
    "requester",
    "entitlement",
    "reason",
    "duration",
    "status",
    "created_at",
    "window_start",
    "window_end",
    "backend",
    "policy_hash",
    "handle",
    "credential_expires_at",
    "attempts",
    "next_attempt_at",
    "last_error",
    "updated_at",
]


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


def _insert(
    db: sqlite_utils.Database, table: str, row: Mapping[str, object], replace: bool = False
) -> None:
    """One plain INSERT of scalar columns. sqlite-utils' insert reads the schema and wraps the
    statement in a savepoint (five statements for one row): too dear on the paths that run for
    every grant and every token."""
    names = list(row)
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    db.execute(
        f"{verb} INTO {table} ({', '.join(names)}) "  # noqa: S608 - names are the store's own
        f"VALUES ({', '.join('?' * len(names))})",
        [row[name] for name in names],
    )


class Transaction:
    """One write transaction: state changes and the audit entries that record them."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self.committed: list[Callable[[], None]] = []

    def after_commit(self, call: Callable[[], None]) -> None:
        """Run `call` once this transaction has committed (never if it rolls back): for what
        must count only what was recorded, such as the metrics."""
        self.committed.append(call)

    def get_grant(self, grant_id: str) -> Grant | None:
        """Read inside the transaction: under the write lock, so what it says still holds."""
        row = self.db.execute("SELECT * FROM grants WHERE id = ?", [grant_id]).fetchone()
        return Grant(**dict(row)) if row else None

    def insert_grant(self, grant: Grant) -> None:
        _insert(self.db, "grants", {name: getattr(grant, name) for name in GRANT_COLUMNS})

    def move_grant(
        self,
        grant_id: str,
        from_status: tuple[str, ...] | str,
        if_handle: str | None = None,
        **changes: object,
    ) -> bool:
        """Change a grant only if it is still in one of `from_status` (and, given `if_handle`,
        still holds that credential: a change that replaces a credential must not replace one
        it never saw); False means someone else moved it first, so the caller must not act."""
        from_status = (from_status,) if isinstance(from_status, str) else from_status
        assignments = ", ".join(f"{name} = :{name}" for name in changes)
        marks = ", ".join(f":s{i}" for i in range(len(from_status)))
        params = dict(changes, id=grant_id, **{f"s{i}": s for i, s in enumerate(from_status)})
        where = f"id = :id AND status IN ({marks})"
        if if_handle is not None:
            where += " AND handle = :if_handle"
            params["if_handle"] = if_handle
        cursor = self.db.execute(
            f"UPDATE grants SET {assignments} WHERE {where}",  # noqa: S608
            params,
        )
        return cursor.rowcount == 1

    def credentials_of(self, grant_id: str) -> list[Credential]:
        """Every credential the grant holds or held, oldest first (under the write lock here)."""
        rows = self.db.execute(
            "SELECT * FROM credentials WHERE grant_id = ? ORDER BY issued_at, rowid", [grant_id]
        )
        return [Credential(**dict(row)) for row in rows]

    def add_credential(self, credential: Credential) -> None:
        _insert(
            self.db,
            "credentials",
            {f.name: getattr(credential, f.name) for f in fields(Credential)},
        )

    def record_handle(self, credential_id: str, handle: str) -> None:
        """Vault answered an extension's claim: the claim becomes the credential it issued."""
        self.db.execute("UPDATE credentials SET handle = ? WHERE id = ?", [handle, credential_id])

    def drop_claim(self, credential_id: str) -> None:
        """Vault issued nothing for this claim: there is nothing to remember."""
        self.db.execute("DELETE FROM credentials WHERE id = ? AND handle = ''", [credential_id])

    def mark_gone(self, grant_id: str, handle: str, at: str) -> None:
        """Its removal was verified: it no longer keeps its grant from being `revoked`."""
        self.db.execute(
            "UPDATE credentials SET gone_at = ? WHERE grant_id = ? AND handle = ? AND gone_at = ''",
            [at, grant_id, handle],
        )

    def add_approval(self, grant_id: str, approval: Approval) -> bool:
        """Record one person's approval; False when that person had already approved."""
        try:
            _insert(
                self.db,
                "approvals",
                {
                    "grant_id": grant_id,
                    "issuer": approval.issuer,
                    "subject": approval.subject,
                    "display": approval.display,
                    "groups": json.dumps(list(approval.groups)),
                    "at": approval.at,
                    "email": approval.email,
                },
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def add_access_token(self, **row: object) -> None:
        _insert(self.db, "access_tokens", row)

    def revoke_access_token(self, jti_hash: str, client_id: str, at: str) -> str | None:
        """Mark the agent's token revoked; its grant id, or None when there was nothing to revoke
        (unknown, another agent's, or revoked already)."""
        row = self.db.execute(
            "SELECT grant_id FROM access_tokens "
            "WHERE jti_hash = ? AND agent = ? AND revoked_at = ''",
            [jti_hash, client_id],
        ).fetchone()
        if row is None:
            return None
        moved = self.db.execute(
            "UPDATE access_tokens SET revoked_at = ? "
            "WHERE jti_hash = ? AND agent = ? AND revoked_at = ''",
            [at, jti_hash, client_id],
        ).rowcount
        return str(row["grant_id"]) if moved == 1 else None

    def use_assertion_jti(self, key: str, until: int, now: float) -> bool:
        """Record a client assertion's jti (by `key`, a hash) as used until `until` (epoch
        seconds); False when it was recorded already. The primary key decides between racing
        requests, in this process or another on the same file; rows past their `until` go first
        (an assertion past it is refused by its exp, used or not)."""
        self.db.execute("DELETE FROM assertion_jtis WHERE until < ?", [now])
        cursor = self.db.execute(
            "INSERT INTO assertion_jtis (key, until) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            [key, until],
        )
        return cursor.rowcount == 1

    def append(self, at: str, type_: str, actor: dict, grant_id: str | None, data: dict) -> dict:
        row = self.db.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = _entry(row) if row else None
        entry = audit.seal(prev, at, type_, actor, grant_id, data)
        _insert(
            self.db,
            "audit",
            dict(entry, actor=json.dumps(entry["actor"]), data=json.dumps(entry["data"])),
        )
        return entry


class Store:
    """One SQLite file; one connection per thread (the web server's and the reaper's).

    `synchronous` is SQLite's durability setting for the WAL. "normal" (the default): a
    committed transaction survives the broker's crash (kill -9) but may roll back if the machine
    loses power before the next sync; "full" syncs at every commit (about 0.15 ms each here).
    Whatever leaves the machine on the strength of the log (a signed checkpoint, an entry sent
    to the SIEM) is made durable first (`make_durable`), so no witness holds what a power loss
    could take back."""

    def __init__(self, path: Path, timeout: float = 30, synchronous: str = "normal"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = Path(path)
        self.timeout = timeout  # seconds to wait for another writer's lock before giving up
        self.synchronous = synchronous
        self._local = threading.local()

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
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    def migrate(self) -> None:
        """Create or upgrade the schema; `PRAGMA user_version` says which version the file has."""
        with self.transaction() as tx:
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema {version}, newer than this broker")
            if version < 1:
                _create_v1(tx.db)
            if version < 2:
                _migrate_v2(tx.db)
            if version < 3:
                _migrate_v3(tx.db)
            if version < 4:
                _migrate_v4(tx.db)
            if version < 5:
                _add_tasks(tx.db)
            if version < 6:
                _add_access_tokens(tx.db)
            if version < 7:
                _add_assertion_jtis(tx.db)
            if version < 8:
                _add_transit_checkpoints(tx.db)
            tx.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """BEGIN IMMEDIATE takes the write lock up front, so the audit chain's head cannot move
        between reading it and appending to it."""
        db = self.db
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

    def get_grant(self, grant_id: str) -> Grant | None:
        return Transaction(self.db).get_grant(grant_id)

    def credentials_of(self, grant_id: str) -> list[Credential]:
        return Transaction(self.db).credentials_of(grant_id)

    def access_token(self, jti_hash: str) -> dict | None:
        """The record of an access token the broker issued, by the SHA-256 of its jti."""
        row = self.db.execute(
            "SELECT * FROM access_tokens WHERE jti_hash = ?", [jti_hash]
        ).fetchone()
        return dict(row) if row else None

    def grant_holding(self, backend: str, handle: str) -> Grant | None:
        """The grant whose current credential of `backend` is `handle` (a task's subject token
        hash), whatever its state."""
        row = self.db.execute(
            "SELECT * FROM grants WHERE handle = ? AND backend = ? AND handle != ''",
            [handle, backend],
        ).fetchone()
        return Grant(**dict(row)) if row else None

    def task_honoured(self, handle: str) -> bool:
        """Whether a task's subject token (by its hash) still names an `active` grant: the one
        fact that proves it dead once false (broker/backends/tool_task.py)."""
        row = self.db.execute(
            "SELECT 1 FROM grants WHERE handle = ? AND backend = 'tool_task' AND status = 'active'",
            [handle],
        ).fetchone()
        return row is not None

    def active_tasks_for(self, issuer: str, subject: str, agent: str) -> list[Grant]:
        """The active task grants a person started for themselves for `agent`, whatever their
        window end says (the caller compares it with its clock)."""
        rows = self.db.execute(
            "SELECT * FROM grants WHERE requester_iss = ? AND requester_sub = ? "
            "AND backend = 'tool_task' AND status = 'active' AND task_agent = ? "
            "AND task_started_by = 'person'",
            [issuer, subject, agent],
        )
        return [Grant(**dict(row)) for row in rows]

    def grants_of(self, issuer: str, subject: str, limit: int = 100) -> list[Grant]:
        rows = self.db.execute(
            "SELECT * FROM grants WHERE requester_iss = ? AND requester_sub = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [issuer, subject, limit],
        )
        return [Grant(**dict(row)) for row in rows]

    def due_grants(self, now: str, limit: int = 200) -> list[Grant]:
        """Grants the reaper must look at now: windows closed, requests gone stale, retries due."""
        rows = self.db.execute(
            "SELECT * FROM grants WHERE due_at != '' AND due_at <= ? ORDER BY due_at LIMIT ?",
            [now, limit],
        )
        return [Grant(**dict(row)) for row in rows]

    def count_due(self, now: str) -> int:
        """How many deadlines (window ends, stale requests, retries) are due and not yet handled."""
        return int(
            self.db.execute(
                "SELECT COUNT(*) FROM grants WHERE due_at != '' AND due_at <= ?", [now]
            ).fetchone()[0]
        )

    def count_by_state(self) -> dict[tuple[str, str], int]:
        """Grants by (status, backend), for the metrics."""
        rows = self.db.execute("SELECT status, backend, COUNT(*) FROM grants GROUP BY 1, 2")
        return {(str(status), str(backend)): int(count) for status, backend, count in rows}

    def next_deadline(self) -> str | None:
        return self.db.execute("SELECT MIN(due_at) FROM grants WHERE due_at != ''").fetchone()[0]

    def count_open(
        self,
        issuer: str,
        subject: str,
        entitlement: str,
        statuses: tuple[str, ...],
        excluding: str = "",
    ) -> int:
        marks = ", ".join("?" for _ in statuses)
        return self.db.execute(
            "SELECT count(*) FROM grants WHERE requester_iss = ? AND requester_sub = ? "  # noqa: S608
            f"AND entitlement = ? AND status IN ({marks}) AND id != ?",
            [issuer, subject, entitlement, *statuses, excluding],
        ).fetchone()[0]

    def grants_in(self, statuses: tuple[str, ...], limit: int = 500) -> list[Grant]:
        marks = ", ".join("?" for _ in statuses)
        rows = self.db.execute(
            f"SELECT * FROM grants WHERE status IN ({marks}) ORDER BY created_at LIMIT ?",  # noqa: S608
            [*statuses, limit],
        )
        return [Grant(**dict(row)) for row in rows]

    def search_grants(
        self,
        person: str = "",
        entitlement: str = "",
        status: str = "",
        break_glass: bool | None = None,
        since: str = "",
        until: str = "",
        before: tuple[str, str] | None = None,
        limit: int = 50,
    ) -> list[Grant]:
        """Grants matching every filter given, newest first (created_at, then id). `person` is
        the requester as displayed or their subject; `since` is inclusive, `until` exclusive.
        Keyset pagination: `before` is the (created_at, id) of the last row of the previous page.
        Each filter has an index on (column, created_at) (schema v3)."""
        where, params = _grant_filters(
            person, entitlement, status, break_glass, since, until, before
        )
        rows = self.db.execute(
            f"SELECT * FROM grants {where} ORDER BY created_at DESC, id DESC LIMIT ?",  # noqa: S608
            [*params, limit],
        )
        return [Grant(**dict(row)) for row in rows]

    def iter_grants(self, batch: int = 500, **filters: Unpack[GrantFilters]) -> Iterator[Grant]:
        """Every grant `search_grants(**filters)` would find, page after page: memory stays at
        one batch, and no read transaction stays open while the caller works (a long one would
        keep the WAL from being checkpointed)."""
        before: tuple[str, str] | None = None
        while True:
            page = self.search_grants(**filters, before=before, limit=batch)
            yield from page
            if len(page) < batch:
                return
            before = (page[-1].created_at, page[-1].id)

    def reviews_overdue(self, now: str, limit: int = 100) -> list[str]:
        """Break-glass grants whose review is past due: their ids, oldest deadline first."""
        rows = self.db.execute(
            "SELECT id FROM grants WHERE break_glass = 1 AND reviewed_at = '' "
            "AND review_due != '' AND review_due <= ? ORDER BY review_due LIMIT ?",
            [now, limit],
        )
        return [row[0] for row in rows]

    def approvals_of(self, grant_id: str) -> list[Approval]:
        rows = self.db.execute(
            "SELECT * FROM approvals WHERE grant_id = ? ORDER BY at, rowid", [grant_id]
        )
        return [
            Approval(
                row["issuer"],
                row["subject"],
                row["display"],
                tuple(json.loads(row["groups"])),
                row["at"],
                row["email"],
            )
            for row in rows
        ]

    def audit_entries(
        self, grant_id: str | None = None, after: int = 0, limit: int = -1
    ) -> Iterator[dict]:
        """Entries in sequence order: all, one grant's, or the next `limit` after seq `after`."""
        if grant_id is None:
            rows = self.db.execute(
                "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", [after, limit]
            )
        else:
            rows = self.db.execute(
                "SELECT * FROM audit WHERE grant_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                [grant_id, after, limit],
            )
        for row in rows:
            yield _entry(row)

    def audit_entries_containing(self, text: str) -> Iterator[dict]:
        """Entries whose data holds `text` (an HMAC fingerprint): a scan, for rare lookups."""
        rows = self.db.execute("SELECT * FROM audit WHERE instr(data, ?) > 0 ORDER BY seq", [text])
        for row in rows:
            yield _entry(row)

    def audit_entry(self, seq: int) -> dict | None:
        row = self.db.execute("SELECT * FROM audit WHERE seq = ?", [seq]).fetchone()
        return _entry(row) if row else None

    def audit_head(self) -> dict | None:
        row = self.db.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return _entry(row) if row else None

    def audit_seq_range(self, since: str = "", until: str = "") -> tuple[int, int]:
        """The first and last seq of the entries written in [since, until) (0, 0: none)."""
        first, last = self.db.execute(
            "SELECT MIN(seq), MAX(seq) FROM audit WHERE at >= ? AND (? = '' OR at < ?)",
            [since, until, until],
        ).fetchone()
        return (first or 0, last or 0)

    def add_checkpoint(self, checkpoint: dict) -> None:
        _insert(self.db, "checkpoints", checkpoint, replace=True)

    def checkpoints(self, first: int = 0, last: int | None = None) -> list[dict]:
        """Signed checkpoints whose size lies in [first, last], smallest first."""
        if self.schema_version() < 3:  # a copy of an older broker's database: none were signed
            return []
        rows = self.db.execute(
            "SELECT * FROM checkpoints WHERE size >= ? AND (? IS NULL OR size <= ?) ORDER BY size",
            [first, last, last],
        )
        # A v1 checkpoint has no key_version, previous or legacy_key_id: not null, absent.
        return [{k: v for k, v in dict(row).items() if v is not None} for row in rows]

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def cursor(self, name: str) -> int:
        """A consumer's position in the audit log (the last seq it has taken)."""
        row = self.db.execute("SELECT seq FROM cursors WHERE name = ?", [name]).fetchone()
        return row[0] if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        self.db.execute(
            "INSERT INTO cursors (name, seq) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq",
            [name, seq],
        )

    # --- browser sessions (broker/web/sessions.py): rows, not rules -----------------------------

    def web_session(self, key: str) -> dict | None:
        row = self.db.execute("SELECT * FROM web_sessions WHERE key = ?", [key]).fetchone()
        return dict(row) if row else None

    def insert_web_session(self, key: str, **columns: object) -> None:
        _insert(self.db, "web_sessions", dict(columns, key=key))

    def update_web_session(self, key: str, **changes: object) -> bool:
        """Change the columns given; False when the session is gone (ended meanwhile)."""
        assignments = ", ".join(f"{name} = :{name}" for name in changes)
        cursor = self.db.execute(
            f"UPDATE web_sessions SET {assignments} WHERE key = :key",  # noqa: S608
            dict(changes, key=key),
        )
        return cursor.rowcount == 1

    def delete_web_session(self, key: str) -> bool:
        return self.db.execute("DELETE FROM web_sessions WHERE key = ?", [key]).rowcount == 1

    def purge_web_sessions(self, now: float) -> int:
        """Delete every session past its idle or absolute deadline; how many went."""
        return self.db.execute("DELETE FROM web_sessions WHERE expires_at <= ?", [now]).rowcount


def _grant_filters(
    person: str,
    entitlement: str,
    status: str,
    break_glass: bool | None,
    since: str,
    until: str,
    before: tuple[str, str] | None,
) -> tuple[str, list]:
    """The WHERE clause of a grant search: fixed clauses, values only as parameters, and only
    the clauses whose filter is set (a "? = '' OR column = ?" clause would defeat the index)."""
    clauses: list[str] = []
    params: list = []
    if person:
        clauses.append("(requester = ? OR requester_sub = ?)")
        params += [person, person]
    for column, value in (("entitlement", entitlement), ("status", status)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if break_glass is not None:
        clauses.append("break_glass = ?")
        params.append(1 if break_glass else 0)
    if since:
        clauses.append("created_at >= ?")
        params.append(since)
    if until:
        clauses.append("created_at < ?")
        params.append(until)
    if before is not None:
        # (created_at, id) < before, written so that created_at bounds an index range
        clauses.append("created_at <= ? AND (created_at < ? OR id < ?)")
        params += [before[0], before[0], before[1]]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rollback(db: sqlite_utils.Database) -> None:
    """Roll back what is still open. SQLite has already rolled back by itself after some
    failures (a full disk at COMMIT), and a second error must not hide the first."""
    if db.conn.in_transaction:
        try:
            db.execute("ROLLBACK")
        except StoreUnavailable:
            pass


def _entry(row: sqlite3.Row) -> dict:
    entry = dict(row)
    entry["actor"] = json.loads(entry["actor"])
    entry["data"] = json.loads(entry["data"])
    return entry


def _create_v1(db: sqlite_utils.Database) -> None:
    columns: dict[str, type] = {name: str for name in V1_GRANT_COLUMNS}
    columns.update(duration=int, attempts=int)
    db.table("grants").create(columns, pk="id", not_null={"status", "entitlement", "window_end"})
    db.table("grants").create_index(["status", "window_end"])
    db.table("grants").create_index(["status", "next_attempt_at"])
    db.table("grants").create_index(["requester_iss", "requester_sub", "created_at"])
    db.table("audit").create(
        {
            "seq": int,
            "at": str,
            "type": str,
            "actor": str,
            "grant_id": str,
            "data": str,
            "prev": str,
            "hash": str,
        },
        pk="seq",
    )
    db.table("audit").create_index(["grant_id", "seq"])


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Approvals, tickets, and one `due_at` deadline per grant in place of next_attempt_at."""
    db.execute("DROP INDEX IF EXISTS idx_grants_status_next_attempt_at")
    db.table("grants").transform(rename={"next_attempt_at": "due_at"})
    db.table("grants").add_column("ticket", str, not_null_default="")
    db.table("grants").add_column("approvals_required", int, not_null_default=0)
    db.table("grants").add_column("closed_reason", str, not_null_default="")
    db.execute("UPDATE grants SET due_at = window_end WHERE status = 'active'")
    db.table("grants").create_index(["due_at"], if_not_exists=True)
    db.table("approvals").create(
        {"grant_id": str, "issuer": str, "subject": str, "display": str, "groups": str, "at": str}
    )
    db.table("approvals").create_index(["grant_id", "issuer", "subject"], unique=True)


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """Break-glass and its review, signed checkpoints, consumer cursors, and the indexes behind
    the auditors' filters (each filter, newest first)."""
    db.table("grants").add_column("break_glass", int, not_null_default=0)
    for name in ("review_due", "reviewed_at", "reviewed_by"):
        db.table("grants").add_column(name, str, not_null_default="")
    for columns in (
        ["created_at"],
        ["requester", "created_at"],
        ["requester_sub", "created_at"],
        ["entitlement", "created_at"],
        ["status", "created_at"],
        ["break_glass", "created_at"],
    ):
        db.table("grants").create_index(columns, if_not_exists=True)
    db.table("audit").create_index(["at"], if_not_exists=True)
    db.table("checkpoints").create(
        {"size": int, "head": str, "at": str, "key_id": str, "signature": str}, pk="size"
    )
    db.table("cursors").create({"name": str, "seq": int}, pk="name")


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """Each step of schema 4 in its own helper."""
    _add_credentials(db)
    _add_web_sessions(db)
    _add_store_faults_v4(db)
    _add_verified_emails(db)


def _add_credentials(db: sqlite_utils.Database) -> None:
    """Every credential a grant ever held (issue #10), so `revoked` can wait for all of them.
    A grant recorded before holds one: its current handle, already gone if it was revoked.
    An extension's claim is stamped with the broker process that made it, so a claim left by
    a dead process is known at once ("": judged by the grace period)."""
    db.table("credentials").create(
        {
            "id": str,
            "grant_id": str,
            "backend": str,
            "handle": str,
            "issued_at": str,
            "gone_at": str,
            "issuing_process": str,
        },
        pk="id",
        not_null={"grant_id", "backend", "handle", "issued_at", "gone_at", "issuing_process"},
        defaults={"gone_at": "", "issuing_process": ""},
    )
    db.table("credentials").create_index(["grant_id", "issued_at"])
    db.execute(
        "INSERT INTO credentials (id, grant_id, backend, handle, issued_at, gone_at) "
        "SELECT 'v4-' || id, id, COALESCE(backend, ''), handle, "
        "COALESCE(NULLIF(window_start, ''), created_at), "
        "CASE WHEN status = 'revoked' THEN COALESCE(NULLIF(updated_at, ''), window_end) ELSE '' "
        "END FROM grants WHERE COALESCE(handle, '') != ''"
    )


def _add_web_sessions(db: sqlite_utils.Database) -> None:
    """Server-side browser sessions (issue 10): the cookie holds only a random id; the row is
    found by its SHA-256 (`key`), so the table alone lets nobody take over a session. `data` (the
    Flask session: login state, CSRF token, messages) and `login` (claims, refresh and ID token)
    are sealed by the web layer. `expires_at` (epoch seconds) is the earlier of the idle and the
    absolute deadline; `checked_at` is when the provider last confirmed the claims."""
    db.table("web_sessions").create(
        {
            "key": str,
            "created_at": float,
            "last_seen": float,
            "expires_at": float,
            "issuer": str,
            "subject": str,
            "checked_at": float,
            "data": bytes,
            "login": bytes,
        },
        pk="key",
        not_null={"created_at", "last_seen", "expires_at"},
        defaults={"issuer": "", "subject": "", "checked_at": 0},
    )
    db.table("web_sessions").create_index(["expires_at"])
    db.table("web_sessions").create_index(["issuer", "subject"])


def _add_store_faults_v4(db: sqlite_utils.Database) -> None:
    """The health check's write (one row, committed for real), and which broker process took
    a grant to `issuing`, so that a starting broker can tell an issuance left by a dead process
    from one in flight in a live one ("": recorded before v4, judged by the grace period)."""
    db.table("write_check").create({"id": int, "writes": int, "at": str}, pk="id")
    db.table("write_check").insert({"id": 1, "writes": 0, "at": ""})
    db.table("grants").add_column("issuing_process", str, not_null_default="")


def _add_verified_emails(db: sqlite_utils.Database) -> None:
    """The requester's and each approver's verified email (lower-cased; "" when not verified or
    recorded before v4), so that separation of duties holds per person across identities."""
    db.table("grants").add_column("requester_email", str, not_null_default="")
    db.table("approvals").add_column("email", str, not_null_default="")


def _add_tasks(db: sqlite_utils.Database) -> None:
    """Schema 5, task grants for agents (issue 12): the agent a grant is for, its tools and
    scopes (canonical JSON) and who started it ("" for every grant before). A subject token is
    found by its hash, the grant's handle, so the handle is indexed."""
    db.table("grants").add_column("task_agent", str, not_null_default="")
    db.table("grants").add_column("task_tools", str, not_null_default="")
    db.table("grants").add_column("task_started_by", str, not_null_default="")
    db.table("grants").create_index(["handle"], if_not_exists=True)


def _add_access_tokens(db: sqlite_utils.Database) -> None:
    """Schema 6, the access tokens handed to agents for tools (issue 12): found by the SHA-256 of
    their jti (the jti alone is no credential, but the table need not hold it), with their grant,
    tool, agent, `exp` (epoch seconds) and when the agent revoked it ("" while it did not)."""
    db.table("access_tokens").create(
        {
            "jti_hash": str,
            "grant_id": str,
            "tool": str,
            "agent": str,
            "issued_at": str,
            "exp": int,
            "revoked_at": str,
        },
        pk="jti_hash",
        not_null={"grant_id", "tool", "agent", "issued_at", "exp", "revoked_at"},
        defaults={"revoked_at": ""},
    )
    db.table("access_tokens").create_index(["grant_id"])


def _add_assertion_jtis(db: sqlite_utils.Database) -> None:
    """Schema 7, private_key_jwt client authentication (RFC 7523): the jti of every client
    assertion accepted, as the SHA-256 of client id and jti, kept until the assertion's exp (epoch
    seconds) so that each is used once."""
    db.table("assertion_jtis").create({"key": str, "until": int}, pk="key", not_null={"until"})
    db.table("assertion_jtis").create_index(["until"])


def _add_transit_checkpoints(db: sqlite_utils.Database) -> None:
    """Schema 8, checkpoints signed through OpenBao transit (issue 17): the key version that
    signed, the size of the checkpoint before (a deleted one is then named), and on the first
    one the v1 key file it takes over from. NULL in the v1 rows before."""
    db.table("checkpoints").add_column("key_version", int)
    db.table("checkpoints").add_column("previous", int)
    db.table("checkpoints").add_column("legacy_key_id", str)
