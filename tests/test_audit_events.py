"""The audit vocabulary is part of the audit format: each entry type keeps its string exactly, so
a log written before the enum existed hashes the same and still verifies."""

from broker import audit
from broker.audit.events import Entry

# Every type the broker has ever written, as the strings stored in existing logs.
WRITTEN = {
    "request", "decision", "approval", "denial", "cancel", "expire_unapproved", "break_glass",
    "review", "issue", "issue_failed", "extend", "extend_lost", "replaced", "release", "expire",
    "revoke", "verify", "revoke_failed", "reconcile",
    "token_issued", "token_revoked",
}  # fmt: skip


def test_every_entry_type_keeps_its_stored_string():
    assert {entry.value for entry in Entry} == WRITTEN


def test_an_entry_sealed_with_the_enum_hashes_as_one_sealed_with_the_string():
    for entry_type in Entry:
        by_enum = audit.seal(None, "2026-01-01T00:00:00Z", entry_type, {"sub": "a"}, "g", {})
        by_text = audit.seal(None, "2026-01-01T00:00:00Z", str(entry_type.value), {"sub": "a"},
                             "g", {})  # fmt: skip
        assert audit.canonical(by_enum) == audit.canonical(by_text)
        assert by_enum["hash"] == by_text["hash"]
        assert f'"type":"{entry_type.value}"'.encode() in audit.canonical(by_enum)
