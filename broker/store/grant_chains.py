"""Every grant row held against its chain inside the database: the first pass of `jit audit
verify`'s state check (audit/state.py), in one statement. The grant's entries of the kinds the
check reads are folded, per grant, into what its chain says (closed by which entry, issued,
ended, every credential verified gone, the last handle and window end, the approvers), and the
row is held against that. Only the grants it cannot vouch for leave the database, and state.py
judges and names them as ever: the SQL may send a grant that is fine, never keep back one that
is not. So wherever the database might read an entry otherwise than Python does (on SQLite:
JSON that is not plain RFC 8259, an escape, a NUL, a key twice; a chain whose fold is not
decided by a few aggregates), the grant is sent, not vouched for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..audit.events import Entry
from ..audit.state import ENDED, READS_DATA, WINDOW_ENTRIES
from ..models import (
    ACTIVE,
    APPROVED,
    CANCELLED,
    DENIED,
    EXPIRED_UNAPPROVED,
    ISSUE_FAILED,
    ISSUING,
    PENDING,
    REVOKED,
)

# The keys of an entry's data (and of an approval's actor) the state check reads.
DATA_KEYS = ("handle", "gone", "window_end")
ACTOR_KEYS = ("iss", "sub")
SEQ_WIDTH = 20  # digits of the seq prefixed to a value, so that the largest is the latest


@dataclass(frozen=True)
class ChainSql:
    """How one database reads entries' JSON and computes an HMAC, for `suspects_sql`.

    `source`: the entries to fold, as a FROM item named `audit` whose `data` and `actor` the
    templates read ({kinds}: the kinds whose data is read, {approval}: the one whose actor is).
    `text`: a key's value ({json}, {key}) as text, NULL when absent or null (a string as
    itself; any other value is `not_text`'s to flag, and its grant is sent). `not_text`: the key
    is there and holds no string. `true`: it holds JSON true. `unsure`: the database's reading
    of a column (its name, the keys read) might differ from Python's json.loads (the grant is
    sent). `latest`: {seq} and {value} as one text, whose largest (`largest`, {}) holds the
    value of the largest seq."""

    source: str
    text: str
    not_text: str
    true: str
    unsure: Callable[[str, tuple[str, ...]], str]
    latest: str
    largest: str


def _in(kinds: Iterable[str]) -> str:
    """A list of the broker's own entry kinds or statuses as SQL literals."""
    words = sorted(str(kind) for kind in kinds)
    if not all(word.replace("_", "").isalpha() for word in words):
        raise ValueError(f"not a plain word among {words}")
    return "(" + ", ".join(f"'{word}'" for word in words) + ")"


def suspects_sql(dialect: ChainSql) -> str:
    """Per grant with entries, by id: (id, 1 when the database vouches for its row, 1 when it
    has a row, the row's handle, the handle its chain records as issued last), for every grant
    not vouched for and every row with a handle on either side: a chain with a request but no
    row, a row whose chain has no request, and every row its chain may disagree with (status,
    window end, approvals). The handles are for the caller to compare by their HMAC: the
    broker's key stays out of the database. The rows with no entry at all are
    ROWS_WITHOUT_ENTRIES'."""
    says = _chain_says(dialect)
    vouched = _row_agrees(dialect)
    return (
        "SELECT grant_id, vouched, has_row, handle, last_issued FROM ("  # noqa: S608
        f"SELECT s.grant_id, CASE WHEN COALESCE({vouched}, 0 = 1) THEN 1 ELSE 0 END AS vouched, "
        "CASE WHEN g.id IS NULL THEN 0 ELSE 1 END AS has_row, g.handle, s.last_issued "
        f"FROM ({says}) s LEFT JOIN grants g ON g.id = s.grant_id) t "
        "WHERE vouched = 0 OR (has_row = 1 AND (COALESCE(handle, '') <> '' "
        "OR last_issued IS NOT NULL)) ORDER BY grant_id"
    )


def _chain_says(dialect: ChainSql) -> str:
    """Per grant id, what its entries say, as aggregates over them (`ChainSays`' fields)."""
    issuing, gone_kinds = _in((Entry.ISSUE, Entry.EXTEND)), _in((Entry.VERIFY, Entry.RECONCILE))
    handle, window_end, iss, sub = (
        dialect.text.format(json=json, key=key)
        for json, key in (("data", "handle"), ("data", "window_end"), ("actor", "iss"),
                          ("actor", "sub"))
    )  # fmt: skip
    gone = dialect.true.format(json="data", key="gone")

    def not_text(json: str, *keys: str) -> str:
        """A key read is there but holds no string (Python's isinstance(..., str) fails)."""
        return " OR ".join(dialect.not_text.format(json=json, key=key) for key in keys)

    def unsure(kinds: tuple[str, ...], json: str, keys: tuple[str, ...], also: str) -> str:
        sure = f"CASE WHEN {dialect.unsure(json, keys)} OR {also} THEN 1 ELSE 0 END"
        return f"WHEN type IN {_in(kinds)} THEN {sure} "

    def latest(kinds: str, value: str) -> str:
        """The value of the entry of `kinds` with the largest seq."""
        key = dialect.latest.format(seq="seq", value=value)
        largest = dialect.largest.format(f"CASE WHEN type IN {kinds} THEN {key} END")
        return f"substr({largest}, {SEQ_WIDTH + 1})"

    # Entries the database might read otherwise than Python: JSON it is unsure of, a key read
    # that holds no string, an issue without a handle (Python ignores it), a gone credential
    # without a handle (Python counts str(None)), an approver without iss or sub. With none of
    # them, each issue or extend entry is one credential issued.
    unsure_entry = (
        unsure((Entry.ISSUE,), "data", ("handle",),
               f"{handle} IS NULL OR {not_text('data', 'handle')}")
        + unsure((Entry.EXTEND,), "data", ("handle", "window_end"),
                 f"{handle} IS NULL OR {not_text('data', 'handle', 'window_end')}")
        + unsure((Entry.VERIFY, Entry.RECONCILE), "data", ("gone", "handle"),
                 f"{not_text('data', 'handle')} OR ({gone} AND {handle} IS NULL)")
        + unsure((Entry.BREAK_GLASS, Entry.RELEASE, Entry.EXPIRE), "data", ("window_end",),
                 not_text("data", "window_end"))
        + unsure((Entry.APPROVAL,), "actor", ACTOR_KEYS,
                 f"{iss} IS NULL OR {sub} IS NULL OR {not_text('actor', *ACTOR_KEYS)}")
    )  # fmt: skip
    approval = f"type = '{Entry.APPROVAL}'"
    pair = f"CAST(length({iss}) AS TEXT) || ':' || {iss} || {sub}"  # a member of the set
    held = (
        "EXISTS (SELECT 1 FROM approvals p WHERE p.grant_id = audit.grant_id "  # noqa: S608
        f"AND p.issuer = {iss} AND p.subject = {sub})"
    )
    gone_handle = f"CASE WHEN type IN {gone_kinds} AND {gone} THEN {handle} END"
    source = dialect.source.format(kinds=_in(READS_DATA), approval=f"'{Entry.APPROVAL}'")
    return (
        "SELECT grant_id, "  # noqa: S608 - the store's own SQL, the kinds its own words
        f"MAX(CASE WHEN type = '{Entry.REQUEST}' THEN 1 ELSE 0 END) AS requested, "
        f"MAX(CASE {unsure_entry}ELSE 0 END) AS unsure, "
        f"COUNT(CASE WHEN type IN {issuing} THEN 1 END) AS issues, "
        f"MIN(CASE WHEN type IN {issuing} THEN seq END) AS first_issue, "
        f"MIN(CASE WHEN type IN {issuing} THEN {handle} END) AS issued_low, "
        f"MAX(CASE WHEN type IN {issuing} THEN {handle} END) AS issued_high, "
        f"{latest(issuing, handle)} AS last_issued, "
        f"COUNT({gone_handle}) AS gones, "
        f"MIN({gone_handle}) AS gone_low, MAX({gone_handle}) AS gone_high, "
        f"{latest(_in(WINDOW_ENTRIES), window_end)} AS window_end, "
        f"MAX(CASE WHEN type IN {_in((Entry.RELEASE, Entry.EXPIRE))} THEN 1 ELSE 0 END) AS ended, "
        # The latest closing entry, its kind in the two low bits of 4 * seq + kind.
        f"MAX(CASE type WHEN '{Entry.DENIAL}' THEN seq * 4 WHEN '{Entry.CANCEL}' "
        f"THEN seq * 4 + 1 WHEN '{Entry.EXPIRE_UNAPPROVED}' THEN seq * 4 + 2 END) AS last_close, "
        f"MIN(CASE WHEN type = '{Entry.ISSUE_FAILED}' THEN seq END) AS first_failed, "
        f"MAX(CASE WHEN type = '{Entry.ISSUE_FAILED}' THEN seq END) AS last_failed, "
        # The approvers: how many entries, how many of them the table holds, and the bounds of
        # their set (no COUNT(DISTINCT): PostgreSQL would sort every entry by grant for it).
        f"COUNT(CASE WHEN {approval} THEN {pair} END) AS approvals, "
        f"COUNT(CASE WHEN {approval} THEN CASE WHEN {held} THEN 1 END END) AS approvals_held, "
        f"MIN(CASE WHEN {approval} THEN {pair} END) AS approver_low, "
        f"MAX(CASE WHEN {approval} THEN {pair} END) AS approver_high FROM {source} "
        "WHERE grant_id IS NOT NULL AND grant_id <> '' GROUP BY grant_id"
    )


def _row_agrees(dialect: ChainSql) -> str:
    """Whether row `g` is what chain `s` says (`ChainSays.statuses` and `_row_against`), where
    the aggregates decide it; where they do not, false (the grant is sent)."""
    # An issue_failed entry closes the grant only while nothing was issued before it: the
    # latest such, when the aggregates decide it (-1: they do not).
    failed = (
        "CASE WHEN s.last_failed IS NULL THEN NULL "
        "WHEN s.first_issue IS NULL OR s.last_failed < s.first_issue THEN s.last_failed "
        "WHEN s.first_failed > s.first_issue THEN NULL ELSE -1 END"
    )
    kind = "s.last_close - s.last_close / 4 * 4"
    closed = (
        f"CASE WHEN {failed} IS NOT NULL "
        f"AND (s.last_close IS NULL OR {failed} * 4 + 3 > s.last_close) THEN '{ISSUE_FAILED}' "
        f"WHEN s.last_close IS NULL THEN NULL WHEN {kind} = 0 THEN '{DENIED}' "
        f"WHEN {kind} = 1 THEN '{CANCELLED}' ELSE '{EXPIRED_UNAPPROVED}' END"
    )
    # With at most two of them, a set of handles is {low, high}: decided by its bounds.
    issued_in_gone = (
        "s.issued_low IN (s.gone_low, s.gone_high) AND s.issued_high IN (s.gone_low, s.gone_high)"
    )
    all_gone = (
        f"s.gones > 0 AND (s.issues <= 2 OR s.issued_low = s.issued_high) AND {issued_in_gone}"
    )
    not_all_gone = f"s.gones = 0 OR (s.gones <= 2 AND NOT ({issued_in_gone}))"
    still_open = (
        f"CASE WHEN s.ended = 1 AND s.issues > 0 AND {all_gone} THEN g.status = '{REVOKED}' "
        f"WHEN s.ended = 1 AND s.issues > 0 AND NOT ({not_all_gone}) THEN 0 = 1 "
        f"WHEN s.ended = 1 THEN g.status IN {_in(ENDED)} "
        f"WHEN s.issues > 0 THEN g.status = '{ACTIVE}' "
        f"ELSE g.status IN {_in((PENDING, APPROVED, ISSUING))} END"
    )
    status = (
        f"CASE WHEN s.last_failed IS NULL AND s.last_close IS NULL THEN {still_open} "
        f"WHEN {failed} = -1 THEN 0 = 1 "
        f"WHEN ({closed}) IS NOT NULL THEN g.status = ({closed}) ELSE {still_open} END"
    )
    return (
        "CASE WHEN g.id IS NULL THEN s.requested = 0 "  # noqa: S608 - the store's own SQL
        "ELSE s.requested = 1 AND s.unsure = 0 "
        "AND (s.window_end IS NULL OR s.window_end = '' OR s.window_end = g.window_end) "
        # Every approval entry's approver in the table, as many distinct ones (at most two
        # entries: one, or two apart) as the table has rows.
        "AND s.approvals_held = s.approvals "
        "AND (s.approvals <= 1 OR (s.approvals = 2 AND s.approver_low <> s.approver_high)) "
        "AND s.approvals = (SELECT COUNT(*) FROM approvals p WHERE p.grant_id = g.id) "
        f"AND ({status}) END"
    )


# The rows whose grant has no entry at all (no group of `suspects_sql`): none, normally.
ROWS_WITHOUT_ENTRIES = (
    "SELECT id FROM grants g WHERE NOT EXISTS (SELECT 1 FROM audit a WHERE a.grant_id = g.id) "
    "ORDER BY id"
)
