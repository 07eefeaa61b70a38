"""What both stores share, written once: the write `Transaction` (state changes and the audit
entries that record them, always together) and every read and small write of the `Store`, in the
SQL SQLite and PostgreSQL both speak (`?` marks parameters; the PostgreSQL store passes them on
as psycopg's own). Knows rows, not rules; never opens a connection itself: each store's module
says how statements run, how transactions begin and lock, and how its failures become
`StoreUnavailable`."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from datetime import datetime
from typing import Any, Protocol, Unpack

from .. import audit
from ..audit.state import handle_fingerprint
from ..audit.storage import GrantFilters
from ..liveness import Processes
from ..models import Approval, Credential, Grant, utcnow
from .grant_chains import ROWS_WITHOUT_ENTRIES, ChainSql, suspects_sql

GRANT_COLUMNS = [f.name for f in fields(Grant)]
GRANT_FIELDS = frozenset(GRANT_COLUMNS)
CREDENTIAL_COLUMNS = [f.name for f in fields(Credential)]
# Named, not `*`: a PostgreSQL table has its `rowid` column besides (schema.Dialect).
# Every column: a file an older broker left, read as it is (`jit audit` never migrates), lacks
# the newer ones, which then take the Grant's defaults (`_grant`); PostgreSQL's rowid is dropped.
SELECT_GRANT = "SELECT * FROM grants"
AUDIT_PAGE = 1000  # entries read at a time
GRANT_PAGE = 5000  # rows read at a time by the state check, a few fields each
IDS_PAGE = 500  # grant ids a statement asks for by `IN (...)`
# An HMAC fingerprint (audit.fingerprint) in an entry's data: what `audit_refs` indexes.
FINGERPRINT = re.compile(r"hmac-sha256:[0-9a-f]{64}")
REFS_SINCE = 10  # the schema version that has audit_refs and the verification mark
SELECT_CREDENTIAL = f"SELECT {', '.join(CREDENTIAL_COLUMNS)} FROM credentials"  # noqa: S608


class Row(Protocol):
    """A row as both drivers give it: by column name (sqlite3.Row, psycopg's dict_row)."""

    def __getitem__(self, key: str) -> Any: ...

    def keys(self) -> Iterable[str]: ...


class Executor(Protocol):
    """Whatever runs one statement: a SQLite connection, or a PostgreSQL one (or its pool)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


class Leadership(Protocol):
    """One process's hold on a job only one of them may do at a time."""

    def holds(self) -> bool: ...

    def close(self) -> None: ...


def _insert(db: Executor, table: str, row: Mapping[str, object], upsert_key: str = "") -> None:
    """One plain INSERT of scalar columns (sqlite-utils' insert reads the schema and wraps the
    statement in a savepoint: five statements for one row, too dear on the paths that run for
    every grant and every token). With `upsert_key`, a row already there under that key is
    replaced."""
    names = list(row)
    sql = (
        f"INSERT INTO {table} ({', '.join(names)}) "  # noqa: S608 - names are the store's own
        f"VALUES ({', '.join('?' * len(names))})"
    )
    if upsert_key:
        updates = ", ".join(f"{name} = excluded.{name}" for name in names if name != upsert_key)
        sql += f" ON CONFLICT ({upsert_key}) DO UPDATE SET {updates}"
    _write(db, sql, [[row[name] for name in names]])


def _grant(row: Row | None) -> Grant | None:
    return _row_grant(row) if row is not None else None


def _row_grant(row: Row) -> Grant:
    return Grant(**{name: row[name] for name in row.keys() if name in GRANT_FIELDS})


class _Unread:
    """The chain's head, not read yet in this transaction."""


UNREAD = _Unread()
# Only what sealing an entry needs of the head: its data is not decoded on every write.
HEAD = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"


class Transaction:
    """One write transaction: state changes and the audit entries that record them. Each store
    begins it holding the write lock (SQLite's BEGIN IMMEDIATE, an advisory lock on PostgreSQL),
    so what it reads still holds when it writes, and the chain's head cannot move between."""

    def __init__(self, db: Any, head: dict | None | _Unread = UNREAD):
        self.db = db
        # The chain's head (seq, hash) under the write lock: read at the first append unless
        # the store read it as it began (PostgreSQL: with BEGIN, no round trip of its own);
        # then the last entry this transaction appended.
        self._head = head
        self.committed: list[Callable[[], None]] = []

    def after_commit(self, call: Callable[[], None]) -> None:
        """Run `call` once this transaction has committed (never if it rolls back): for what
        must count only what was recorded, such as the metrics. Each store runs them."""
        self.committed.append(call)

    def use_assertion_jti(self, key: str, until: int, now: float) -> bool:
        """Record a client assertion's jti (by `key`, a hash) as used until `until` (epoch
        seconds); False when it was recorded already. The primary key decides between racing
        requests, in this process or another replica; rows past their `until` go first (an
        assertion past it is refused by its exp, used or not)."""
        self.db.execute("DELETE FROM assertion_jtis WHERE until < ?", [now])
        cursor = self.db.execute(
            "INSERT INTO assertion_jtis (key, until) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            [key, until],
        )
        return bool(cursor.rowcount == 1)

    def get_grant(self, grant_id: str) -> Grant | None:
        """Read inside the transaction: under the write lock, so what it says still holds."""
        return _grant(self.db.execute(f"{SELECT_GRANT} WHERE id = ?", [grant_id]).fetchone())

    def insert_grant(self, grant: Grant) -> None:
        _insert(self.db, "grants", {name: getattr(grant, name) for name in GRANT_COLUMNS})

    def move_grant(
        self,
        grant_id: str,
        from_status: tuple[str, ...] | str,
        if_handle: str | None = None,
        if_attempts: int | None = None,
        **changes: object,
    ) -> bool:
        """Change a grant only if it is still in one of `from_status` (and, given `if_handle`,
        still holds that credential: a change that replaces a credential must not replace one
        it never saw; given `if_attempts`, is still the claim of that attempt: the fence that
        keeps a reaper paused past its claim from recording over the next claim's work); False
        means someone else moved it first, so the caller must not act."""
        from_status = (from_status,) if isinstance(from_status, str) else from_status
        assignments = ", ".join(f"{name} = ?" for name in changes)
        marks = ", ".join("?" for _ in from_status)
        params: list[object] = [*changes.values(), grant_id, *from_status]
        where = f"id = ? AND status IN ({marks})"
        if if_handle is not None:
            where += " AND handle = ?"
            params.append(if_handle)
        if if_attempts is not None:
            where += " AND attempts = ?"
            params.append(if_attempts)
        cursor = self.db.execute(
            f"UPDATE grants SET {assignments} WHERE {where}",  # noqa: S608
            params,
        )
        return bool(cursor.rowcount == 1)

    def move_grants(
        self,
        read: Sequence[tuple[str, str, int, str]],
        count_attempt: bool = False,
        **changes: object,
    ) -> set[str]:
        """`move_grant` for many grants in one statement: change each grant still as it was
        read, (id, status, attempts, window_end); with `count_attempt`, its attempt count goes up
        by one (a claim's, whose fence the count is). Returns the ids changed: any other was
        moved by someone else first, so the caller must not act on it."""
        if not read:
            return set()
        assignments = [f"{name} = ?" for name in changes]
        if count_attempt:
            assignments.append("attempts = attempts + 1")
        rows = ", ".join("(?, ?, ?, ?)" for _ in read)
        cursor = self.db.execute(
            f"UPDATE grants SET {', '.join(assignments)} "  # noqa: S608 - names are the store's
            f"WHERE (id, status, attempts, window_end) IN (VALUES {rows}) RETURNING id",
            [*changes.values(), *(value for row in read for value in row)],
        )
        return {str(row["id"]) for row in cursor}

    def credentials_of(self, grant_id: str) -> list[Credential]:
        """Every credential the grant holds or held, oldest first (under the write lock here)."""
        rows = self.db.execute(
            f"{SELECT_CREDENTIAL} WHERE grant_id = ? ORDER BY issued_at, rowid", [grant_id]
        )
        return [Credential(**dict(row)) for row in rows]

    def credentials_of_many(self, grant_ids: Collection[str]) -> dict[str, list[Credential]]:
        """`credentials_of` for many grants in one query: each grant's list (empty when none)."""
        found: dict[str, list[Credential]] = {grant_id: [] for grant_id in grant_ids}
        if not found:
            return found
        marks = ", ".join("?" for _ in found)
        rows = self.db.execute(
            f"{SELECT_CREDENTIAL} WHERE grant_id IN ({marks}) "  # noqa: S608
            "ORDER BY grant_id, issued_at, rowid",
            list(found),
        )
        for row in rows:
            found[row["grant_id"]].append(Credential(**dict(row)))
        return found

    def add_credential(self, credential: Credential) -> None:
        _insert(
            self.db, "credentials", {name: getattr(credential, name) for name in CREDENTIAL_COLUMNS}
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

    def mark_gone_many(self, credential_ids: Collection[str], at: str) -> None:
        """`mark_gone` for many credentials at once, by their ids."""
        if credential_ids:
            marks = ", ".join("?" for _ in credential_ids)
            self.db.execute(
                f"UPDATE credentials SET gone_at = ? WHERE gone_at = '' AND id IN ({marks})",  # noqa: S608
                [at, *credential_ids],
            )

    def add_approval(self, grant_id: str, approval: Approval) -> bool:
        """Record one person's approval; False when that person had already approved."""
        cursor = self.db.execute(
            "INSERT INTO approvals (grant_id, issuer, subject, display, groups, at, email) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [
                grant_id,
                approval.issuer,
                approval.subject,
                approval.display,
                json.dumps(list(approval.groups)),
                approval.at,
                approval.email,
            ],
        )
        return bool(cursor.rowcount == 1)

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

    def append(self, at: str, type_: str, actor: dict, grant_id: str | None, data: dict) -> dict:
        """Seal the entry over the head and append it. The head cannot move meanwhile (the write
        lock), and `seq` is the primary key, so two writers could never both append seq N."""
        return self.append_many([(at, type_, actor, grant_id, data)])[0]

    def append_many(self, entries: Iterable[tuple[str, str, dict, str | None, dict]]) -> list[dict]:
        """`append` for many entries (at, type, actor, grant_id, data): sealed one after the
        other over the head, then written by one INSERT run for all of them, and one for their
        fingerprints' index, rather than two statements an entry. Returns the sealed entries."""
        prev = self._head
        if isinstance(prev, _Unread):  # the head as committed; after the first append, its own
            row = self.db.execute(HEAD).fetchone()
            prev = {"seq": row["seq"], "hash": row["hash"]} if row else None
        sealed: list[dict] = []
        rows: list[list[object]] = []
        refs: list[list[object]] = []
        for at, type_, actor, grant_id, data in entries:
            entry = audit.seal(prev, at, type_, actor, grant_id, data)
            # Canonical JSON in the columns: the store can then give back the exact bytes the
            # hash covers (Store.LINE), and verification hashes them without decoding
            # (audit/lines.py).
            data_text = audit.canonical(entry["data"]).decode()
            actor_text = audit.canonical(entry["actor"]).decode()
            seq, link, hash_ = entry["seq"], entry["prev"], entry["hash"]
            rows.append([seq, at, entry["type"], actor_text, grant_id, data_text, link, hash_])
            refs += _refs(seq, data_text)
            sealed.append(entry)
            prev = self._head = entry
        _insert_rows(self.db, "audit", AUDIT_COLUMNS, rows)
        _insert_rows(self.db, "audit_refs", REF_COLUMNS, refs)
        return sealed


# The audit table's columns in the order `append_many` writes them, and its index's.
AUDIT_COLUMNS = ("seq", "at", "type", "actor", "grant_id", "data", "prev", "hash")
REF_COLUMNS = ("fingerprint", "seq")


def _refs(seq: int, data_text: str) -> list[list[object]]:
    """The `audit_refs` rows of an entry: each HMAC fingerprint its data holds, once."""
    return [[found, seq] for found in sorted(set(FINGERPRINT.findall(data_text)))]


def _insert_rows(db: Any, table: str, names: Sequence[str], rows: list[list[object]]) -> None:
    """One INSERT for many `rows` (each the values of `names`, in order), written by `_write`."""
    if not rows:
        return
    sql = (
        f"INSERT INTO {table} ({', '.join(names)}) "  # noqa: S608 - names are the store's own
        f"VALUES ({', '.join('?' * len(names))})"
    )
    _write(db, sql, rows)


def _write(db: Any, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """A write whose answer nobody reads, for `rows` (each the statement's parameters): left
    for later where the store's transaction can send it with the next statement that needs an
    answer (PostgreSQL: one pipeline, one round trip); else run now, many rows by the driver's
    executemany (psycopg's pipeline, the statement parsed once; sqlite3's own on SQLite, whose
    `db` is sqlite-utils' wrapper of the connection), one row by one plain statement."""
    later = getattr(db, "write_later", None)
    if later is not None:
        later(sql, rows)
    elif len(rows) == 1:
        db.execute(sql, rows[0])
    else:
        run = getattr(db, "executemany", None) or db.conn.executemany
        run(sql, rows)


def fill_audit_refs(db: Executor) -> None:
    """The lookup index for entries written before it existed (migration 10), page by page."""
    after = 0
    while True:
        rows = list(
            db.execute(
                "SELECT seq, data FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                [after, AUDIT_PAGE],
            )
        )
        refs = [ref for row in rows for ref in _refs(row["seq"], row["data"] or "")]
        _insert_rows(db, "audit_refs", REF_COLUMNS, refs)
        if len(rows) < AUDIT_PAGE:
            return
        after = rows[-1]["seq"]


def line_sql(quote: str, table: str = "") -> str:
    """The canonical line of an entry (chain.canonical of its fields: sorted keys, no spaces)
    composed in SQL from its columns (of `table`, given as "a."), `quote` making a JSON string of
    a text column. Equal to the bytes its hash covers when actor and data are stored canonical
    (every entry written since migration 10); any column edited since changes it."""
    fields = [
        ("actor", f"{table}actor"),
        ("at", quote.format(f"{table}at")),
        ("data", f"{table}data"),
        ("grant_id", quote.format(f"{table}grant_id")),
        ("prev", quote.format(f"{table}prev")),
        ("seq", f"CAST({table}seq AS TEXT)"),
        ("type", quote.format(f"{table}type")),
    ]
    parts = " || ".join(
        f"'{',' if i else '{'}\"{name}\":' || {sql}" for i, (name, sql) in enumerate(fields)
    )
    return f"{parts} || '}}'"


class Store(ABC):
    """The broker's store: the reads and small writes both databases answer alike. A subclass
    gives `db` (what runs one statement now), `transaction`, the schema version, the clock that
    decides deadlines, and the durability and wake-up hooks."""

    # Whether entries' data holds a text: SQLite's instr, PostgreSQL's strpos.
    CONTAINS = "instr(data, ?) > 0"
    QUOTE = "json_quote({})"  # a text column as a JSON string (NULL as null)
    # SHA-256 of a text, as lowercase hex, computed by the database: on SQLite the function
    # sqlite.py registers on each connection (over the text's UTF-8 bytes, as a blob).
    HASH = "jit_sha256(CAST({} AS BLOB))"
    # How the database reads entries' JSON and computes an HMAC (grant_chains.py).
    CHAIN_SQL: ChainSql

    @property
    @abstractmethod
    def db(self) -> Any:
        """What runs one statement for the calling thread (inside its open transaction, if any)."""

    def tuples(self, sql: str, params: list[object]) -> list[tuple]:
        """Every row of one statement as a plain tuple, in the order of its columns: for the
        reads that go through every row (a named row costs more to make and to read)."""
        return [tuple(row[name] for name in row.keys()) for row in self.db.execute(sql, params)]

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction holding the store's write lock from its first statement."""

    @abstractmethod
    def migrate(self) -> None:
        """Create or upgrade the schema (schema.py), once, whoever else starts at the same time."""

    @abstractmethod
    def schema_version(self) -> int: ...

    @abstractmethod
    def check_writable(self) -> None:
        """Raise unless a write can be committed now (it commits one)."""

    def make_durable(self) -> None:  # noqa: B027 (a hook: nothing to do unless said)
        """Make every transaction committed so far survive a power loss (before anything leaves
        the machine on the strength of the log). A commit is durable already unless said."""

    def now(self) -> datetime:
        """The clock that decides deadlines (window ends, due grants, claim leases): the
        process's for SQLite (one machine), the database's for PostgreSQL (every replica the
        same)."""
        return utcnow()

    def announce(self) -> None:  # noqa: B027 (a hook: nothing to do unless said)
        """Tell the other broker processes on this store that deadlines changed (a new grant, a
        release): SQLite's brokers share one machine and poll, PostgreSQL's are notified."""

    def listen(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` whenever another process announces; returns what stops listening."""
        return lambda: None

    @abstractmethod
    def leadership(self, job: str) -> Leadership:
        """Whether this process is the one (of all sharing the store) that does `job`; taken
        over by another when the holder dies."""

    @abstractmethod
    def processes(self) -> Processes:
        """This process's claim to be alive, for as long as it runs, and the test of another's
        (liveness.py): a lock file beside a SQLite database, a lock in PostgreSQL."""

    def close(self) -> None:  # noqa: B027 (a hook: nothing to do unless said)
        """Give back what the store holds open (it opens again when next used)."""

    # --- grants ----------------------------------------------------------------------------------

    def get_grant(self, grant_id: str) -> Grant | None:
        return Transaction(self.db).get_grant(grant_id)

    def credentials_of(self, grant_id: str) -> list[Credential]:
        return Transaction(self.db).credentials_of(grant_id)

    def credentials_of_many(self, grant_ids: Collection[str]) -> dict[str, list[Credential]]:
        return Transaction(self.db).credentials_of_many(grant_ids)

    def access_token(self, jti_hash: str) -> dict | None:
        """The record of an access token the broker issued, by the SHA-256 of its jti."""
        row = self.db.execute(
            "SELECT * FROM access_tokens WHERE jti_hash = ?", [jti_hash]
        ).fetchone()
        return dict(row) if row else None

    def grant_holding(self, backend: str, handle: str) -> Grant | None:
        """The grant whose current credential of `backend` is `handle` (a task's subject token
        hash), whatever its state."""
        return _grant(
            self.db.execute(
                f"{SELECT_GRANT} WHERE handle = ? AND backend = ? AND handle != ''",
                [handle, backend],
            ).fetchone()
        )

    def task_honoured(self, handle: str) -> bool:
        """Whether a task's subject token (by its hash) still names an `active` grant: the one
        fact that proves it dead once false (broker/backends/tool_task.py)."""
        row = self.db.execute(
            "SELECT 1 AS found FROM grants "
            "WHERE handle = ? AND backend = 'tool_task' AND status = 'active'",
            [handle],
        ).fetchone()
        return row is not None

    def grants_of(self, issuer: str, subject: str, limit: int = 100) -> list[Grant]:
        rows = self.db.execute(
            f"{SELECT_GRANT} WHERE requester_iss = ? AND requester_sub = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [issuer, subject, limit],
        )
        return [_row_grant(row) for row in rows]

    def due_grants(self, now: str, limit: int = 200) -> list[Grant]:
        """Grants the reaper must look at now: windows closed, requests gone stale, retries due."""
        rows = self.db.execute(
            f"{SELECT_GRANT} WHERE due_at != '' AND due_at <= ? ORDER BY due_at LIMIT ?",
            [now, limit],
        )
        return [_row_grant(row) for row in rows]

    def active_tasks_for(self, issuer: str, subject: str, agent: str) -> list[Grant]:
        """The active task grants a person started for themselves for `agent`, whatever their
        window end says (the caller compares it with its clock)."""
        rows = self.db.execute(
            f"{SELECT_GRANT} WHERE requester_iss = ? AND requester_sub = ? "
            "AND backend = 'tool_task' AND status = 'active' AND task_agent = ? "
            "AND task_started_by = 'person'",
            [issuer, subject, agent],
        )
        return [_row_grant(row) for row in rows]

    def count_due(self, now: str) -> int:
        """How many deadlines (window ends, stale requests, retries) are due and not yet handled."""
        row = self.db.execute(
            "SELECT COUNT(*) AS due FROM grants WHERE due_at != '' AND due_at <= ?", [now]
        ).fetchone()
        return int(row["due"])

    def count_by_state(self) -> dict[tuple[str, str], int]:
        """Grants by (status, backend), for the metrics."""
        rows = self.db.execute(
            "SELECT status, backend, COUNT(*) AS n FROM grants GROUP BY status, backend"
        )
        return {(str(row["status"]), str(row["backend"])): int(row["n"]) for row in rows}

    def next_deadline(self) -> str | None:
        row = self.db.execute("SELECT MIN(due_at) AS due FROM grants WHERE due_at != ''").fetchone()
        return row["due"] if row else None

    def count_open(
        self,
        issuer: str,
        subject: str,
        entitlement: str,
        statuses: tuple[str, ...],
        excluding: str = "",
    ) -> int:
        marks = ", ".join("?" for _ in statuses)
        row = self.db.execute(
            "SELECT count(*) AS n FROM grants WHERE requester_iss = ? AND requester_sub = ? "  # noqa: S608
            f"AND entitlement = ? AND status IN ({marks}) AND id != ?",
            [issuer, subject, entitlement, *statuses, excluding],
        ).fetchone()
        return int(row["n"])

    def grants_in(self, statuses: tuple[str, ...], limit: int = 500) -> list[Grant]:
        marks = ", ".join("?" for _ in statuses)
        rows = self.db.execute(
            f"{SELECT_GRANT} WHERE status IN ({marks}) ORDER BY created_at LIMIT ?",
            [*statuses, limit],
        )
        return [_row_grant(row) for row in rows]

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
            f"{SELECT_GRANT} {where} ORDER BY created_at DESC, id DESC LIMIT ?",
            [*params, limit],
        )
        return [_row_grant(row) for row in rows]

    def iter_grants(self, batch: int = 500, **filters: Unpack[GrantFilters]) -> Iterator[Grant]:
        """Every grant `search_grants(**filters)` would find, page after page: memory stays at
        one batch, and no read transaction stays open while the caller works (a long one would
        keep SQLite's WAL from being checkpointed)."""
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
        return [row["id"] for row in rows]

    def approvals_of(self, grant_id: str) -> list[Approval]:
        rows = self.db.execute(  # every column: a file older than v4 has no email
            "SELECT * FROM approvals WHERE grant_id = ? ORDER BY at, rowid", [grant_id]
        )
        return [_approval(row) for row in rows]

    def approvals_by_grant(self) -> dict[str, list[Approval]]:
        """Every approval, by grant: one read for `jit audit verify`, not one a grant."""
        found: dict[str, list[Approval]] = {}
        for row in self.db.execute("SELECT * FROM approvals ORDER BY at, rowid"):
            found.setdefault(row["grant_id"], []).append(_approval(row))
        return found

    # --- the audit log (broker/audit/storage.py's AuditStore) ------------------------------------

    def audit_entries(
        self, grant_id: str | None = None, after: int = 0, limit: int = -1
    ) -> Iterator[dict]:
        """Entries in sequence order: all, one grant's, or the next `limit` after seq `after`.
        Read in pages by seq: memory stays at one page (a PostgreSQL result is read whole), and
        no read stays open while the caller works (on SQLite it would hold back the WAL)."""
        grant_clause = "" if grant_id is None else "grant_id = ? AND "
        sql = f"SELECT * FROM audit WHERE {grant_clause}seq > ? ORDER BY seq LIMIT ?"  # noqa: S608
        left = limit
        while left != 0:
            page = AUDIT_PAGE if left < 0 else min(left, AUDIT_PAGE)
            params = [after, page] if grant_id is None else [grant_id, after, page]
            rows = list(self.db.execute(sql, params))
            for row in rows:
                yield _entry(row)
            if len(rows) < page:
                return
            after = rows[-1]["seq"]
            left = left - len(rows) if left > 0 else left

    def audit_lines(self, after: int = 0) -> Iterator[tuple[int, str, str, str, str | None]]:
        """(seq, at, prev, hash, canonical line) of each entry after seq `after`, paged like
        `audit_entries`; the line is composed from the columns (`line_sql`)."""
        sql = (
            f"SELECT seq, at, prev, hash, {line_sql(self.QUOTE)} AS line FROM audit "  # noqa: S608
            "WHERE seq > ? ORDER BY seq LIMIT ?"
        )
        while True:
            rows = list(self.db.execute(sql, [after, AUDIT_PAGE]))
            for row in rows:
                yield row["seq"], row["at"], row["prev"], row["hash"], row["line"]
            if len(rows) < AUDIT_PAGE:
                return
            after = rows[-1]["seq"]

    def audit_span(self, after: int = 0, last: int | None = None) -> tuple[int, int]:
        """How many entries there are with seq in (after, last], and the largest seq among them
        (0, `after` when none): contiguous exactly when the largest is `after` + how many."""
        sql = "SELECT COUNT(*) AS n, MAX(seq) AS top FROM audit WHERE seq > ?"
        params: list[object] = [after]
        if last is not None:
            sql, params = sql + " AND seq <= ?", [after, last]
        row = self.db.execute(sql, params).fetchone()
        return int(row["n"]), int(row["top"] if row["top"] is not None else after)

    def audit_suspects(self, after: int, last: int) -> Iterator[tuple[int, str, str, bool, bool]]:
        """(seq, prev, hash, sealed, linked) of the entries in (after, last] that the database
        cannot vouch for, hashing each stored line (`line_sql`, `HASH`) and joining each entry to
        the one before: `sealed`, the line hashes to the entry's hash; `linked`, its prev is the
        hash of the entry at seq - 1. The first entry of the range always comes, whatever its
        link (what it must link to is the caller's to say). Only these rows leave the database,
        page by page, so an intact log costs one scan and no row read through the driver."""
        line = self.HASH.format(line_sql(self.QUOTE, "a."))
        sql = (
            "SELECT seq, prev, hash, sealed, linked FROM ("  # noqa: S608 - the store's own SQL
            "SELECT a.seq AS seq, a.prev AS prev, a.hash AS hash, "
            f"COALESCE({line} = a.hash, FALSE) AS sealed, "
            "COALESCE(b.hash = a.prev, FALSE) AS linked "
            "FROM audit a LEFT JOIN audit b ON b.seq = a.seq - 1 "
            "WHERE a.seq > ? AND a.seq <= ?) checked "
            "WHERE seq = ? OR NOT (sealed AND linked) ORDER BY seq LIMIT ?"
        )
        cursor = after
        while True:
            rows = list(self.db.execute(sql, [cursor, last, after + 1, AUDIT_PAGE]))
            for row in rows:
                yield (row["seq"], row["prev"], row["hash"], bool(row["sealed"]),
                       bool(row["linked"]))  # fmt: skip
            if len(rows) < AUDIT_PAGE:
                return
            cursor = rows[-1]["seq"]

    def audit_marks(self, seqs: Iterable[int]) -> dict[int, tuple[str, str]]:
        """(at, hash) of the entries at `seqs` (those there are), read a page of seqs at a time."""
        wanted = sorted(set(seqs))
        found: dict[int, tuple[str, str]] = {}
        for start in range(0, len(wanted), AUDIT_PAGE):
            page = wanted[start : start + AUDIT_PAGE]
            marks = ", ".join("?" for _ in page)
            rows = self.db.execute(
                f"SELECT seq, at, hash FROM audit WHERE seq IN ({marks})",  # noqa: S608
                page,
            )
            for row in rows:
                found[int(row["seq"])] = (row["at"], row["hash"])
        return found

    def audit_grant_entries(
        self, kinds: Collection[str], grant_ids: Collection[str] | None = None
    ) -> Iterator[tuple[str | None, str, str | None, str | None]]:
        """(grant_id, type, actor, data) of every entry of a grant whose type is one of `kinds`,
        or of the grants of `grant_ids` only (the few the database could not vouch for), in
        sequence order, actor and data as stored (JSON text): for the state check, which
        decodes only what it reads. Plain tuples, a page at a time: a row costs what the driver
        charges and no more."""
        marks = ", ".join("?" for _ in kinds)
        if grant_ids is None:
            sql = (
                "SELECT seq, grant_id, type, actor, data FROM audit "  # noqa: S608
                f"WHERE seq > ? AND grant_id IS NOT NULL AND type IN ({marks}) "
                "ORDER BY seq LIMIT ?"
            )
            return self._tuples_by_seq(sql, list(kinds))
        rows: list[tuple] = []
        for page in _pages(sorted(grant_ids)):
            ids = ", ".join("?" for _ in page)
            sql = (
                "SELECT seq, grant_id, type, actor, data FROM audit "  # noqa: S608
                f"WHERE grant_id IN ({ids}) AND type IN ({marks})"
            )
            rows += self.tuples(sql, [*page, *kinds])
        return (row[1:] for row in sorted(rows, key=lambda row: row[0]))

    def audit_grant_times(
        self, kinds: Collection[str], since: str
    ) -> Iterator[tuple[str, str, str, str | None]]:
        """(grant_id, type, at, data) of every grant's entry of `kinds` written at or after
        `since`, in sequence order: the dashboard's one read of the log, where one query per
        grant took seconds over a busy fortnight."""
        marks = ", ".join("?" for _ in kinds)
        sql = (
            "SELECT seq, grant_id, type, at, data FROM audit "  # noqa: S608
            f"WHERE seq > ? AND grant_id IS NOT NULL AND type IN ({marks}) AND at >= ? "
            "ORDER BY seq LIMIT ?"
        )
        return self._tuples_by_seq(sql, [*kinds, since])

    def _tuples_by_seq(self, sql: str, params: list[object]) -> Iterator[tuple]:
        """The rows of `sql` (its first column seq, its placeholders `seq > ?`, then `params`,
        then LIMIT) page after page, without the seq."""
        after = 0
        while True:
            rows = self.tuples(sql, [after, *params, GRANT_PAGE])
            for row in rows:
                yield row[1:]
            if len(rows) < GRANT_PAGE:
                return
            after = rows[-1][0]

    def grant_states(
        self, grant_ids: Collection[str] | None = None
    ) -> Iterator[tuple[str, str, str, str]]:
        """(id, status, window_end, handle) of every grant, or of those of `grant_ids`, by id, a
        page at a time: the state check's read of the table (a whole `Grant` a row costs
        several times as much)."""
        if grant_ids is not None:
            for page in _pages(sorted(grant_ids)):
                ids = ", ".join("?" for _ in page)
                yield from self.tuples(
                    "SELECT id, status, window_end, handle FROM grants "  # noqa: S608
                    f"WHERE id IN ({ids}) ORDER BY id",
                    list(page),
                )
            return
        sql = "SELECT id, status, window_end, handle FROM grants WHERE id > ? ORDER BY id LIMIT ?"
        after = ""
        while True:
            rows = self.tuples(sql, [after, GRANT_PAGE])
            yield from rows
            if len(rows) < GRANT_PAGE:
                return
            after = rows[-1][0]

    def grants_unlike_chains(self, fingerprint_key: bytes) -> list[str] | None:
        """The ids of the grants whose row the database cannot vouch for against the grant's
        chain (grant_chains.py: those that disagree, and any it is not sure of), by id; the
        handles compared here, by their HMAC under `fingerprint_key` (none: not compared). None
        when the database's JSON parser refused an entry (SQLite's or PostgreSQL's): then every
        grant is for the state check to judge."""
        try:
            rows = self.tuples(suspects_sql(self.CHAIN_SQL), [])
        except Exception as exc:
            if not self.json_refused(exc):
                raise
            return None
        found = {
            grant_id
            for grant_id, vouched, has_row, handle, last_issued in rows
            if not vouched
            or (
                has_row
                and fingerprint_key
                and handle_fingerprint(fingerprint_key, handle) != (last_issued or "")
            )
        }
        found.update(row[0] for row in self.tuples(ROWS_WITHOUT_ENTRIES, []))
        return sorted(found)

    def json_refused(self, exc: Exception) -> bool:
        """Whether `exc` is the database refusing to read a text as JSON."""
        return False

    def audit_entries_containing(self, text: str) -> Iterator[dict]:
        """Entries whose data holds `text`: an HMAC fingerprint through the `audit_refs` index;
        anything else, or a database an older broker left (`jit audit` never migrates), a scan."""
        if FINGERPRINT.fullmatch(text) and self.schema_version() >= REFS_SINCE:
            rows = self.db.execute(
                "SELECT a.* FROM audit_refs r JOIN audit a ON a.seq = r.seq "
                "WHERE r.fingerprint = ? ORDER BY r.seq",
                [text],
            )
        else:
            rows = self.db.execute(
                f"SELECT * FROM audit WHERE {self.CONTAINS} ORDER BY seq",  # noqa: S608
                [text],
            )
        for row in rows:
            yield _entry(row)

    def verified_mark(self) -> tuple[int, str]:
        """The persisted "verified through" mark: (seq, its hash), (0, "") before any."""
        if self.schema_version() < REFS_SINCE:
            return 0, ""
        row = self.db.execute("SELECT seq, hash FROM cursors WHERE name = 'verified'").fetchone()
        return (int(row["seq"]), str(row["hash"])) if row else (0, "")

    def set_verified_mark(self, seq: int, hash_: str) -> None:
        self.db.execute(
            "INSERT INTO cursors (name, seq, hash) VALUES ('verified', ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            [seq, hash_],
        )

    def audit_entry(self, seq: int) -> dict | None:
        row = self.db.execute("SELECT * FROM audit WHERE seq = ?", [seq]).fetchone()
        return _entry(row) if row else None

    def audit_head(self) -> dict | None:
        row = self.db.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return _entry(row) if row else None

    def audit_seq_range(self, since: str = "", until: str = "") -> tuple[int, int]:
        """The first and last seq of the entries written in [since, until) (0, 0: none)."""
        row = self.db.execute(
            "SELECT MIN(seq) AS first, MAX(seq) AS last FROM audit "
            "WHERE at >= ? AND (? = '' OR at < ?)",
            [since, until, until],
        ).fetchone()
        return (row["first"] or 0, row["last"] or 0)

    def add_checkpoint(self, checkpoint: dict) -> None:
        _insert(self.db, "checkpoints", checkpoint, upsert_key="size")

    def checkpoints(self, first: int = 0, last: int | None = None) -> list[dict]:
        """Signed checkpoints whose size lies in [first, last], smallest first."""
        if self.schema_version() < 3:  # a copy of an older broker's database: none were signed
            return []
        sql, params = "SELECT * FROM checkpoints WHERE size >= ?", [first]
        if last is not None:
            sql, params = sql + " AND size <= ?", [first, last]
        rows = self.db.execute(sql + " ORDER BY size", params)
        # A v1 checkpoint has no key_version, previous or legacy_key_id: not null, absent.
        return [{k: v for k, v in dict(row).items() if v is not None} for row in rows]

    def cursor(self, name: str) -> int:
        """A consumer's position in the audit log (the last seq it has taken)."""
        row = self.db.execute("SELECT seq FROM cursors WHERE name = ?", [name]).fetchone()
        return int(row["seq"]) if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        self.db.execute(
            "INSERT INTO cursors (name, seq) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
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
        assignments = ", ".join(f"{name} = ?" for name in changes)
        cursor = self.db.execute(
            f"UPDATE web_sessions SET {assignments} WHERE key = ?",  # noqa: S608
            [*changes.values(), key],
        )
        return bool(cursor.rowcount == 1)

    def delete_web_session(self, key: str) -> bool:
        return bool(self.db.execute("DELETE FROM web_sessions WHERE key = ?", [key]).rowcount == 1)

    def purge_web_sessions(self, now: float) -> int:
        """Delete every session past its idle or absolute deadline; how many went."""
        cursor = self.db.execute("DELETE FROM web_sessions WHERE expires_at <= ?", [now])
        return int(cursor.rowcount)


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


def _pages(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), IDS_PAGE):
        yield values[start : start + IDS_PAGE]


def _approval(row: Row) -> Approval:
    return Approval(
        row["issuer"],
        row["subject"],
        row["display"],
        tuple(json.loads(row["groups"])),
        row["at"],
        row["email"] if "email" in row.keys() else "",
    )


def _entry(row: Row) -> dict:
    entry = dict(row)
    entry["actor"] = json.loads(entry["actor"])
    entry["data"] = json.loads(entry["data"])
    return entry
