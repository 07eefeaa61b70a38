"""Tampering with a real database file and with exported bundles: each kind of change is detected
and named with the right sequence number, by `jit audit verify` as an auditor runs it. These logs
are signed by the v1 Ed25519 key file of brokers before transit signing (issue 17): such logs
exist in the field and must still verify. Their entries are dated weeks ago, so `run` gives the
CLI a checkpoint interval that owes nothing; absence itself is tested in test_audit_evidence."""

import json
import shutil
import zipfile

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit
from broker.audit.bundle import OcsfMapper
from broker.audit.log import AuditLog
from broker.cli import main as jit
from tests.helpers import storage_section, store_at

ALICE = {"iss": "https://idp", "sub": "alice"}


@pytest.fixture
def data_dir(tmp_path):
    """Ten entries; a signed checkpoint after entry 5 and another after entry 8."""
    store = store_at(tmp_path / "broker.db")
    store.migrate()
    key = audit.load_or_create_key(tmp_path / "audit-signing.key")
    (tmp_path / "audit-hmac.key").write_bytes(b"k" * 32)
    log = AuditLog(store, b"k" * 32, key, checkpoint_copy=tmp_path / "audit-checkpoints.jsonl")
    for n in range(1, 11):
        with store.transaction() as tx:
            tx.append(f"2026-11-0{1 + n // 5}T00:00:{n:02d}Z", "step", ALICE, "g1", {"n": n})
        if n in (5, 8):
            log.checkpoint()
    return tmp_path


A_LONG_INTERVAL = str(10**9)  # seconds: no checkpoint is ever owed


def run(data_dir, *args, every=A_LONG_INTERVAL):
    env = {"JIT_SERVER_DATA_DIR": str(data_dir), "JIT_CONFIG": "", "JIT_VAULT_TOKEN": "",
           "JIT_AUDIT_CHECKPOINT_EVERY": every}  # fmt: skip
    env.update(
        {f"JIT_STORAGE_{key.upper()}": value for key, value in storage_section(data_dir).items()}
    )
    return CliRunner().invoke(jit, list(args), env=env)


def verify(data_dir, *args, every=A_LONG_INTERVAL):
    result = run(data_dir, "audit", "verify", *args, every=every)
    return result.exit_code, result.output.strip()


def sql(data_dir, *statements):
    """What someone with write access to the database does behind the broker's back."""
    store = store_at(data_dir / "broker.db")
    try:
        for statement in statements:
            store.db.execute(*statement) if isinstance(statement, tuple) else store.db.execute(
                statement
            )
    finally:
        store.close()


def row(data_dir, seq):
    store = store_at(data_dir / "broker.db")
    try:
        entry = dict(store.db.execute("SELECT * FROM audit WHERE seq = ?", [seq]).fetchone())
    finally:
        store.close()
    return dict(entry, actor=json.loads(entry["actor"]), data=json.loads(entry["data"]))


def test_an_untouched_log_verifies_and_says_how_far_it_is_signed(data_dir):
    assert verify(data_dir) == (
        0,
        "ok: 10 entries, chain intact, signed through seq 8 (seq 9 to 10 not yet signed)",
    )


def test_an_edited_field_is_named(data_dir):
    sql(data_dir, """UPDATE audit SET data = '{"n":42}' WHERE seq = 3""")
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 3: entry 3 was edited")


def test_an_edited_actor_with_every_later_hash_recomputed_is_caught_by_the_checkpoint(data_dir):
    """The forger rewrites entry 3 and re-chains everything after it: each link holds, but the
    signed checkpoint of size 5 names a different head."""
    entries = [row(data_dir, seq) for seq in range(1, 11)]
    entries[2]["actor"] = {"iss": "https://idp", "sub": "mallory"}
    prev = entries[1]
    for entry in entries[2:]:
        entry.update(prev=prev["hash"])
        entry["hash"] = audit.entry_hash(entry)
        prev = entry
    sql(
        data_dir,
        *[
            ("UPDATE audit SET actor = ?, prev = ?, hash = ? WHERE seq = ?",
             [json.dumps(e["actor"]), e["prev"], e["hash"], e["seq"]])
            for e in entries[2:]
        ],
    )  # fmt: skip
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 5: entry 5 is not the one the signed")


def test_a_deleted_entry_is_named(data_dir):
    sql(data_dir, "DELETE FROM audit WHERE seq = 4")
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 4: entry 4 is missing: deleted")


def test_an_inserted_entry_is_named(data_dir):
    """A forged entry slipped in at 4, linked to entry 3 and sealed, the rest renumbered."""
    forged = audit.seal(row(data_dir, 3), "2026-11-01T00:00:03Z", "approve", ALICE, "g1", {})
    sql(
        data_dir,
        "UPDATE audit SET seq = seq + 1000 WHERE seq >= 4",
        "UPDATE audit SET seq = seq - 999 WHERE seq >= 1004",
        ("INSERT INTO audit (seq, at, type, actor, grant_id, data, prev, hash) "
         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
         [4, forged["at"], "approve", json.dumps(ALICE), "g1", "{}", forged["prev"],
          forged["hash"]]),
    )  # fmt: skip
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 4: entry 4 was inserted")


def test_two_swapped_entries_are_named(data_dir):
    sql(
        data_dir,
        "UPDATE audit SET seq = 1000 WHERE seq = 6",
        "UPDATE audit SET seq = 6 WHERE seq = 7",
        "UPDATE audit SET seq = 7 WHERE seq = 1000",
    )
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 6: entries 6 and 7 were swapped")


def test_a_log_cut_short_after_a_checkpoint_is_named(data_dir):
    sql(data_dir, "DELETE FROM audit WHERE seq > 6")
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 7: the log ends at seq 6")
    assert "cut short" in output


def test_a_log_cut_short_with_its_checkpoints_deleted_is_caught_by_their_copies(data_dir):
    sql(data_dir, "DELETE FROM audit WHERE seq > 6", "DELETE FROM checkpoints")
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 7: the log ends at seq 6")
    (data_dir / "audit-checkpoints.jsonl").unlink()  # both together: no checkpoint is left...
    assert verify(data_dir)[0] == 0  # ...which no cadence explains away but a checkpoint interval:
    code, output = verify(data_dir, every="60")
    assert code == 1 and output.startswith("FAILED at seq 1: entries 1 to 6 are not covered")


def test_a_replaced_signing_key_is_named_at_the_first_checkpoint(data_dir):
    (data_dir / "audit-signing.key").unlink()
    audit.load_or_create_key(data_dir / "audit-signing.key")
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 5: checkpoint of size 5: signed by key")
    assert "the signing key was replaced" in output


def test_a_replaced_key_that_re_signed_everything_fails_against_the_pinned_key(data_dir):
    """Whoever holds the database and the key directory can re-sign: the auditor's copy of the
    public key, fetched earlier, is what catches it."""
    pinned = data_dir / "pinned.pem"
    pinned.write_text(audit.public_pem(audit.load_private_key(data_dir / "audit-signing.key")
                                       .public_key()))  # fmt: skip
    (data_dir / "audit-signing.key").unlink()
    (data_dir / "audit-checkpoints.jsonl").unlink()
    new_key = audit.load_or_create_key(data_dir / "audit-signing.key")
    store = store_at(data_dir / "broker.db")
    for checkpoint in store.checkpoints():
        store.add_checkpoint(
            audit.sign_checkpoint(new_key, checkpoint["size"], checkpoint["head"], checkpoint["at"])
        )
    assert verify(data_dir)[0] == 0  # the new key, no copies: consistent...
    code, output = verify(data_dir, "--public-key", str(pinned))
    assert code == 1 and output.startswith("FAILED at seq 5: checkpoint of size 5")


# --- bundles ------------------------------------------------------------------------------------


def export(data_dir, fmt="jsonl", *args):
    target = data_dir / f"bundle-{fmt}.zip"
    result = run(data_dir, "audit", "export", "--format", fmt, "-o", str(target), *args)
    assert result.exit_code == 0, result.output
    return target, result.output


def verify_bundle(bundle, *args):
    result = CliRunner().invoke(jit, ["audit", "verify", "--bundle", str(bundle), *args])
    return result.exit_code, result.output.strip()


def rewrite(bundle, name, change):
    """Rewrite one member of the zip, as someone editing the export would."""
    with zipfile.ZipFile(bundle) as source:
        members = {item: source.read(item) for item in source.namelist()}
    members[name] = change(members[name].decode()).encode()
    with zipfile.ZipFile(bundle, "w") as target:
        for item, content in members.items():
            target.writestr(item, content)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "ocsf"])
def test_export_then_verify_offline_round_trip(data_dir, fmt, tmp_path_factory):
    bundle, output = export(data_dir, fmt)
    assert "10 entries (seq 1 to 10), 2 signed checkpoints" in output
    elsewhere = tmp_path_factory.mktemp("auditor") / "bundle.zip"
    shutil.copy(bundle, elsewhere)  # no database, no key files, no network there
    assert verify_bundle(elsewhere) == (
        0,
        "ok: 10 entries, chain intact, signed through seq 8 (seq 9 to 10 not yet signed)",
    )


def test_export_of_a_time_range_verifies_on_its_own(data_dir):
    bundle, output = export(data_dir, "jsonl", "--since", "2026-11-02", "--until", "2026-11-03")
    assert "5 entries (seq 5 to 9), 2 signed checkpoints" in output
    code, text = verify_bundle(bundle)
    assert code == 0 and text.startswith("ok: 5 entries, chain intact, signed through seq 8")


def lines_edit(index, change):
    def edit(text):
        lines = text.splitlines(keepends=True)
        change(lines, index)
        return "".join(lines)

    return edit


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda lines, i: lines.__setitem__(i, lines[i].replace('"n":3', '"n":4')),
         "FAILED at seq 3: entry 3 was edited"),
        (lambda lines, i: lines.pop(i), "FAILED at seq 3: entry 3 is missing: deleted"),
        (lambda lines, i: lines.insert(i, lines[i - 1]),
         "FAILED at seq 2: two entries claim seq 2"),
        (lambda lines, i: lines.insert(i + 1, lines.pop(i)),
         "FAILED at seq 3: entries 3 and 4 are out of order"),
        (lambda lines, i: lines.__delitem__(slice(i + 4, None)),
         "FAILED at seq 7: the log ends at seq 6"),
    ],
    ids=["edited", "deleted", "inserted", "reordered", "cut-short"],
)  # fmt: skip
def test_a_tampered_bundle_is_named(data_dir, change, expected):
    bundle, _ = export(data_dir)
    rewrite(bundle, "entries.jsonl", lines_edit(2, change))
    code, output = verify_bundle(bundle)
    assert code == 1 and output.startswith(expected), output


def test_a_bundle_cut_short_below_its_last_checkpoint_but_with_the_manifest_intact(data_dir):
    bundle, _ = export(data_dir)
    rewrite(bundle, "entries.jsonl", lambda text: "".join(text.splitlines(True)[:9]))
    code, output = verify_bundle(bundle)
    assert code == 1 and output.startswith("FAILED at seq 10: the manifest lists entries up to")


def test_an_edited_csv_column_outside_the_entry_is_named(data_dir):
    bundle, _ = export(data_dir, "csv")
    # Only the readable actor_sub column of seq 2's row: the entry's own actor JSON is untouched.
    rewrite(bundle, "entries.csv", lines_edit(2, lambda lines, i: lines.__setitem__(
        i, lines[i].replace(",alice,", ",mallory,"))))  # fmt: skip
    code, output = verify_bundle(bundle)
    assert code == 1 and output.startswith("FAILED at seq 2: entry 2 was edited"), output


def test_an_edited_ocsf_field_outside_the_entry_is_named(data_dir):
    bundle, _ = export(data_dir, "ocsf")

    def blame_mallory(text):
        lines = text.splitlines(keepends=True)
        lines[5] = lines[5].replace('"actor":{"idp"', '"actor":{"mallory":1,"idp"')
        return "".join(lines)

    rewrite(bundle, "entries.ocsf.jsonl", blame_mallory)
    code, output = verify_bundle(bundle)
    assert code == 1 and output.startswith("FAILED at seq 6: entry 6 was edited"), output


def as_mapping_1(bundle):
    """The bundle as a broker from before OCSF mapping 2 wrote it: its events, its manifest."""

    def events(text):
        mapper = OcsfMapper(mapping=1)
        return "".join(
            json.dumps(
                mapper.event(json.loads(json.loads(line)["raw_data"])), separators=(",", ":")
            )
            + "\n"
            for line in text.splitlines()
        )

    def manifest(text):
        written = json.loads(text)
        del written["ocsf_mapping"]
        return json.dumps(written)

    rewrite(bundle, "entries.ocsf.jsonl", events)
    rewrite(bundle, "manifest.json", manifest)


def test_an_ocsf_bundle_written_before_mapping_2_still_verifies_and_edits_still_show(data_dir):
    bundle, _ = export(data_dir, "ocsf")
    as_mapping_1(bundle)
    code, output = verify_bundle(bundle)
    assert code == 0, output

    rewrite(bundle, "entries.ocsf.jsonl", lines_edit(3, lambda lines, i: lines.__setitem__(
        i, lines[i].replace('"status":"Success"', '"status":"Failure"'))))  # fmt: skip
    code, output = verify_bundle(bundle)
    assert code == 1 and output.startswith("FAILED at seq 4: entry 4 was edited"), output


def test_a_bundle_with_its_key_and_checkpoints_replaced_fails_against_the_pinned_key(data_dir):
    bundle, _ = export(data_dir)
    pinned = data_dir / "pinned.pem"
    with zipfile.ZipFile(bundle) as source:
        pinned.write_bytes(source.read("public-key.pem"))
    forger = Ed25519PrivateKey.generate()

    def re_sign(text):
        signed = [json.loads(line) for line in text.splitlines()]
        return "".join(
            audit.canonical(audit.sign_checkpoint(forger, c["size"], c["head"], c["at"])).decode()
            + "\n"
            for c in signed
        )

    rewrite(bundle, "checkpoints.jsonl", re_sign)
    forged = audit.Keyring.of_file_key(forger.public_key(), pinned=True).as_json()
    rewrite(bundle, "keys.json", lambda _: json.dumps(forged))
    assert verify_bundle(bundle)[0] == 0  # consistent with itself...
    code, output = verify_bundle(bundle, "--public-key", str(pinned))  # ...not with the pinned key
    assert code == 1 and output.startswith("FAILED at seq 5: checkpoint of size 5: signed by key")


def test_a_file_that_is_not_a_bundle_is_one_readable_error(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_text("not a zip")
    code, output = verify_bundle(junk)
    assert code == 1 and output.startswith("Error: ") and "is not a bundle" in output


def test_export_refuses_to_overwrite_and_bad_times_are_readable(data_dir):
    export(data_dir)
    result = run(data_dir, "audit", "export", "-o", str(data_dir / "bundle-jsonl.zip"))
    assert result.exit_code == 1 and "exists" in result.output
    result = run(data_dir, "audit", "export", "--since", "yesterday", "-o", "x.zip")
    assert result.exit_code == 2 and "is not a date" in result.output


def test_lookup_finds_a_value_only_by_its_hmac(data_dir):
    store = store_at(data_dir / "broker.db")
    mark = audit.fingerprint(b"k" * 32, "accessor-abc")
    with store.transaction() as tx:
        tx.append("2026-11-03T00:00:00Z", "issue", ALICE, "g2", {"identifiers": {"accessor": mark}})
    found = run(data_dir, "audit", "lookup", "accessor-abc")
    assert found.exit_code == 0 and " issue " in found.output and "g2" in found.output
    assert "accessor-abc" not in found.output
    missing = run(data_dir, "audit", "lookup", "accessor-xyz")
    assert missing.exit_code == 1 and missing.output.startswith("not found")


def test_an_edit_behind_the_pages_verified_mark_is_named_by_jit_audit_verify(data_dir):
    """The pages' background verification moves on from its mark; `jit audit verify` reads the
    whole log again, so an entry edited behind the mark is still named (issue 15)."""
    store = store_at(data_dir / "broker.db")
    try:
        log = AuditLog(store, b"k" * 32, audit.load_or_create_key(data_dir / "audit-signing.key"))
        assert log.advance().ok and store.verified_mark()[0] == 10
        store.db.execute("""UPDATE audit SET data = '{"n":42}' WHERE seq = 4""")
        with store.transaction() as tx:
            tx.append("2026-11-03T00:00:00Z", "step", ALICE, "g1", {"n": 11})
        assert log.advance().ok and store.verified_mark()[0] == 11  # on from the mark
    finally:
        store.close()
    code, output = verify(data_dir)
    assert code == 1 and output.startswith("FAILED at seq 4: entry 4 was edited"), output
