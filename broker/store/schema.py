"""The one schema of the broker's store and the one way it gets there: versioned migrations,
written once in the SQL that SQLite and PostgreSQL share, with a tiny per-dialect map of the few
types they spell differently. A database at any earlier version (a SQLite file an older broker
left, or an empty PostgreSQL database) is brought up by running every later step in order, in
one transaction. Never knows how statements are run: each store runs them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    """How one database spells what the portable statements leave open."""

    name: str
    integer: str  # a 64-bit integer (SQLite's INTEGER is one already)
    real: str
    blob: str
    # The insertion order some reads break ties with: SQLite's implicit rowid, a column named so
    # on PostgreSQL (which has none). Empty, or a column definition after the table's last one.
    rowid: str


SQLITE = Dialect("sqlite", "INTEGER", "REAL", "BLOB", "")
POSTGRES = Dialect(
    "postgresql",
    "BIGINT",
    "DOUBLE PRECISION",
    "BYTEA",
    ", rowid BIGINT GENERATED ALWAYS AS IDENTITY",
)


@dataclass(frozen=True)
class Migration:
    version: int
    why: str
    statements: tuple[str, ...]

    def sql(self, dialect: Dialect) -> list[str]:
        """The statements in `dialect`: {int}, {real}, {blob} and {rowid} filled in."""
        names = {
            "int": dialect.integer,
            "real": dialect.real,
            "blob": dialect.blob,
            "rowid": dialect.rowid,
        }
        return [statement.format(**names) for statement in self.statements]


def _index(table: str, *columns: str, unique: bool = False) -> str:
    """An index named as sqlite-utils named them, so a file an older broker made and a fresh one
    have the same indexes."""
    name = f"idx_{table}_{'_'.join(columns)}"
    kind = "UNIQUE INDEX" if unique else "INDEX"
    return f"CREATE {kind} IF NOT EXISTS {name} ON {table} ({', '.join(columns)})"


def _text_columns(table: str, *names: str) -> tuple[str, ...]:
    return tuple(
        f"ALTER TABLE {table} ADD COLUMN {name} TEXT NOT NULL DEFAULT ''" for name in names
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "Grants and the audit chain.",
        (
            "CREATE TABLE grants (id TEXT PRIMARY KEY, requester_iss TEXT, requester_sub TEXT, "
            "requester TEXT, entitlement TEXT NOT NULL, reason TEXT, duration {int}, "
            "status TEXT NOT NULL, created_at TEXT, window_start TEXT, window_end TEXT NOT NULL, "
            "backend TEXT, policy_hash TEXT, handle TEXT, credential_expires_at TEXT, "
            "attempts {int}, next_attempt_at TEXT, last_error TEXT, updated_at TEXT{rowid})",
            _index("grants", "status", "window_end"),
            _index("grants", "status", "next_attempt_at"),
            _index("grants", "requester_iss", "requester_sub", "created_at"),
            "CREATE TABLE audit (seq {int} PRIMARY KEY, at TEXT, type TEXT, actor TEXT, "
            "grant_id TEXT, data TEXT, prev TEXT, hash TEXT)",
            _index("audit", "grant_id", "seq"),
        ),
    ),
    Migration(
        2,
        "Approvals, tickets, and one `due_at` deadline per grant in place of next_attempt_at.",
        (
            "DROP INDEX IF EXISTS idx_grants_status_next_attempt_at",
            "ALTER TABLE grants RENAME COLUMN next_attempt_at TO due_at",
            "ALTER TABLE grants ADD COLUMN ticket TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE grants ADD COLUMN approvals_required {int} NOT NULL DEFAULT 0",
            "ALTER TABLE grants ADD COLUMN closed_reason TEXT NOT NULL DEFAULT ''",
            "UPDATE grants SET due_at = window_end WHERE status = 'active'",
            _index("grants", "due_at"),
            "CREATE TABLE approvals (grant_id TEXT, issuer TEXT, subject TEXT, display TEXT, "
            "groups TEXT, at TEXT{rowid})",
            _index("approvals", "grant_id", "issuer", "subject", unique=True),
        ),
    ),
    Migration(
        3,
        "Break-glass and its review, signed checkpoints, consumer cursors, and the indexes "
        "behind the auditors' filters (each filter, newest first).",
        (
            "ALTER TABLE grants ADD COLUMN break_glass {int} NOT NULL DEFAULT 0",
            *_text_columns("grants", "review_due", "reviewed_at", "reviewed_by"),
            _index("grants", "created_at"),
            _index("grants", "requester", "created_at"),
            _index("grants", "requester_sub", "created_at"),
            _index("grants", "entitlement", "created_at"),
            _index("grants", "status", "created_at"),
            _index("grants", "break_glass", "created_at"),
            _index("audit", "at"),
            "CREATE TABLE checkpoints (size {int} PRIMARY KEY, head TEXT, at TEXT, key_id TEXT, "
            "signature TEXT)",
            "CREATE TABLE cursors (name TEXT PRIMARY KEY, seq {int})",
        ),
    ),
    Migration(
        4,
        # Every credential a grant ever held (issue 10), so `revoked` can wait for all of them;
        # a grant recorded before holds one: its current handle, already gone if it was revoked.
        # An extension's claim, and an issuance, are stamped with the broker process that made
        # it ("": judged by the grace period). Server-side browser sessions, found by the
        # SHA-256 of the cookie's id. The health check's write. Verified emails ("": none).
        "Credentials, browser sessions, the health check's write, issuing processes, and "
        "verified emails.",
        (
            "CREATE TABLE credentials (id TEXT PRIMARY KEY, grant_id TEXT NOT NULL, "
            "backend TEXT NOT NULL, handle TEXT NOT NULL, issued_at TEXT NOT NULL, "
            "gone_at TEXT NOT NULL DEFAULT '', issuing_process TEXT NOT NULL DEFAULT ''{rowid})",
            _index("credentials", "grant_id", "issued_at"),
            "INSERT INTO credentials (id, grant_id, backend, handle, issued_at, gone_at) "
            "SELECT 'v4-' || id, id, COALESCE(backend, ''), handle, "
            "COALESCE(NULLIF(window_start, ''), created_at), "
            "CASE WHEN status = 'revoked' THEN COALESCE(NULLIF(updated_at, ''), window_end) "
            "ELSE '' END FROM grants WHERE COALESCE(handle, '') != '' ORDER BY created_at, id",
            "CREATE TABLE web_sessions (key TEXT PRIMARY KEY, created_at {real} NOT NULL, "
            "last_seen {real} NOT NULL, expires_at {real} NOT NULL, issuer TEXT DEFAULT '', "
            "subject TEXT DEFAULT '', checked_at {real} DEFAULT 0, data {blob}, login {blob})",
            _index("web_sessions", "expires_at"),
            _index("web_sessions", "issuer", "subject"),
            "CREATE TABLE write_check (id {int} PRIMARY KEY, writes {int}, at TEXT)",
            "INSERT INTO write_check (id, writes, at) VALUES (1, 0, '')",
            *_text_columns("grants", "issuing_process", "requester_email"),
            *_text_columns("approvals", "email"),
        ),
    ),
    Migration(
        5,
        # The agent a grant is for, its tools and scopes (canonical JSON) and who started it; a
        # subject token is found by its hash, the grant's handle.
        "Task grants for agents (issue 12).",
        (
            *_text_columns("grants", "task_agent", "task_tools", "task_started_by"),
            _index("grants", "handle"),
        ),
    ),
    Migration(
        6,
        # Found by the SHA-256 of their jti, with their grant, tool, agent, `exp` (epoch
        # seconds) and when the agent revoked it ("" while it did not).
        "The access tokens handed to agents for tools (issue 12).",
        (
            "CREATE TABLE access_tokens (jti_hash TEXT PRIMARY KEY, grant_id TEXT NOT NULL, "
            "tool TEXT NOT NULL, agent TEXT NOT NULL, issued_at TEXT NOT NULL, "
            "exp {int} NOT NULL, revoked_at TEXT NOT NULL DEFAULT '')",
            _index("access_tokens", "grant_id"),
        ),
    ),
    Migration(
        7,
        # The SHA-256 of client id and jti of every client assertion accepted, kept until the
        # assertion's exp (epoch seconds), so that each is used once across replicas.
        "private_key_jwt client authentication for agents (RFC 7523, issue 12).",
        (
            "CREATE TABLE assertion_jtis (key TEXT PRIMARY KEY, until {int} NOT NULL)",
            _index("assertion_jtis", "until"),
        ),
    ),
    Migration(
        8,
        # The key version that signed, the size of the checkpoint before (a deleted one is then
        # named), and on the first one the v1 key file it takes over from; NULL in v1 rows.
        "Checkpoints signed through OpenBao transit (issue 17).",
        (
            "ALTER TABLE checkpoints ADD COLUMN key_version {int}",
            "ALTER TABLE checkpoints ADD COLUMN previous {int}",
            "ALTER TABLE checkpoints ADD COLUMN legacy_key_id TEXT",
        ),
    ),
    Migration(
        9,
        # A requester's open grants of one entitlement (its max_active), counted through an
        # index of their own rather than by scanning every grant the requester ever had.
        "The index behind counting a requester's open grants (issue 15).",
        (_index("grants", "requester_iss", "requester_sub", "entitlement", "status"),),
    ),
    Migration(
        10,
        # Each HMAC fingerprint an entry's data holds, with the entry's seq, so that `jit audit
        # lookup` is an index read (filled for earlier entries by the store's migrate, in
        # Python: SQL cannot find them portably). The hash beside the `verified` cursor: the
        # auditor pages' "verified through" mark, advanced in the background.
        "The audit lookup index and the persisted verification mark (issue 15).",
        (
            "CREATE TABLE audit_refs (fingerprint TEXT NOT NULL, seq {int} NOT NULL)",
            _index("audit_refs", "fingerprint", "seq"),
            *_text_columns("cursors", "hash"),
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def pending(version: int, dialect: Dialect) -> list[str]:
    """Every statement that takes a database at `version` to SCHEMA_VERSION, in order."""
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"the database has schema {version}, newer than this broker")
    return [sql for step in MIGRATIONS if step.version > version for sql in step.sql(dialect)]
