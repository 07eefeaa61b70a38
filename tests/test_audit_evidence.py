"""Evidence that holds when the broker's own host does not (issue 17), against the real OpenBao:
checkpoints signed by its transit key, witnessed in KV v2 and by the SIEM, missing checkpoints
named, and the grants table held against the chain. Each tampering is made on a real database
file and named by `jit audit verify` as an auditor runs it."""

import json
import shutil
import uuid
import zipfile
from datetime import timedelta

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker import audit
from broker.audit.absence import Cadence
from broker.audit.bundle import verify_bundle
from broker.audit.log import AuditLog
from broker.audit.transit_signing import TransitCheckpointSigner
from broker.audit.witness import KvWitness
from broker.cli import main as jit
from broker.models import isoformat, utcnow
from scripts.launchers import AUDIT_KEY, configure_witness, free_port
from tests.helpers import (
    APPROVAL_POLICY,
    HttpReceiver,
    health,
    storage_section,
    store_at,
    wait_until,
)

ALICE = {"iss": "https://idp", "sub": "alice"}
SIGNED_AT = (2, 5, 8, 10)  # the sizes the fixture's log is signed at


class Log:
    """A data directory whose log the broker signed through transit, as it runs: ten entries,
    one every five minutes over the last hour, a checkpoint half a minute after entries 2, 5, 8
    and 10, each also written to a KV v2 witness of its own."""

    def __init__(self, path, openbao, signer=None):
        self.path, self.openbao = path, openbao
        self.witness_path = f"evidence/{uuid.uuid4().hex}"
        root = openbao.client()
        configure_witness(root, self.witness_path)
        self.store = store_at(path / "broker.db")
        self.store.migrate()
        (path / "audit-hmac.key").write_bytes(b"k" * 32)
        self.moment = [utcnow()]
        self.log = AuditLog(
            self.store,
            b"k" * 32,
            signer or TransitCheckpointSigner(openbao.client(openbao.broker_token)),
            checkpoint_copy=path / "audit-checkpoints.jsonl",
            clock=lambda: self.moment[0],
            cadence=Cadence(60, 120),
            witness=KvWitness(root, "secret", self.witness_path),
        )

    def write(self, numbers, sign_at=SIGNED_AT):
        for n in numbers:
            when = utcnow() - timedelta(minutes=55 - 5 * n)
            with self.store.transaction() as tx:
                tx.append(isoformat(when), "step", ALICE, None, {"n": n})
            if n in sign_at:
                self.moment[0] = when + timedelta(seconds=30)
                assert self.log.checkpoint()["size"] == n

    def verify(self, *args, token=None, **env):
        """`jit audit verify` with an auditor's own token (it reads the witness)."""
        result = CliRunner().invoke(jit, ["audit", "verify", *args], env=self.env(token, **env))
        return result.exit_code, result.output.strip()

    def env(self, token=None, **extra):
        return {
            "JIT_CONFIG": "",
            "JIT_SERVER_DATA_DIR": str(self.path),
            **{f"JIT_STORAGE_{k.upper()}": v for k, v in storage_section(self.path).items()},
            "JIT_VAULT_ADDR": self.openbao.addr,
            "JIT_VAULT_TOKEN": token or self.openbao.root_token,
            "JIT_AUDIT_CHECKPOINT_EVERY": "60",
            "JIT_AUDIT_WITNESS_KV": f"secret/{self.witness_path}",
            **extra,
        }

    def sql(self, *statements):
        """An intruder's writes, straight into the database (whichever store is under test)."""
        with self.store.transaction() as tx:
            for statement in statements:
                tx.db.execute(*statement) if isinstance(statement, tuple) else tx.db.execute(
                    statement
                )

    def entry(self, seq):
        return self.store.audit_entry(seq)

    def forget_checkpoint(self, size):
        """Gone from the database and from the copy beside it: what a careful intruder does."""
        self.sql(("DELETE FROM checkpoints WHERE size = ?", [size]))
        copy = self.path / "audit-checkpoints.jsonl"
        kept = [line for line in copy.read_text().splitlines() if json.loads(line)["size"] != size]
        copy.write_text("".join(line + "\n" for line in kept))


@pytest.fixture
def signed(tmp_path, openbao, vault_setup):
    log = Log(tmp_path, openbao)
    log.write(range(1, 11))
    return log


def rechain(log, first, change):
    """Rewrite entry `first` and re-link every entry after it, hashes recomputed."""
    entries = [log.entry(seq) for seq in range(1, log.store.audit_head()["seq"] + 1)]
    change(entries[first - 1])
    for entry in entries[first - 1 :]:
        entry["prev"] = entries[entry["seq"] - 2]["hash"] if entry["seq"] > 1 else audit.GENESIS
        entry["hash"] = audit.entry_hash(entry)
    log.sql(
        *[
            ("UPDATE audit SET data = ?, prev = ?, hash = ? WHERE seq = ?",
             [json.dumps(e["data"]), e["prev"], e["hash"], e["seq"]])
            for e in entries[first - 1 :]
        ]
    )  # fmt: skip
    return entries


# --- signed through transit --------------------------------------------------------------------


def test_an_untouched_log_verifies_against_its_witness(signed):
    checkpoints = signed.store.checkpoints()
    assert [c["size"] for c in checkpoints] == list(SIGNED_AT)
    assert [c["previous"] for c in checkpoints] == [0, 2, 5, 8]
    assert all(c["key_id"] == f"transit:{AUDIT_KEY}:v{c['key_version']}" for c in checkpoints)
    assert all(c["signature"].startswith(f"vault:v{c['key_version']}:") for c in checkpoints)
    assert signed.verify("--witness", "openbao") == (
        0,
        "ok: 10 entries, chain intact, signed through seq 10",
    )
    # The broker's own token reads its keys too (the policy's read of transit/keys/...).
    assert signed.verify(token=signed.openbao.broker_token, JIT_AUDIT_WITNESS_KV="")[0] == 0


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda log: log.sql("""UPDATE audit SET data = '{"n":42}' WHERE seq = 3"""),
         "FAILED at seq 3: entry 3 was edited"),
        (lambda log: log.sql("DELETE FROM audit WHERE seq = 4"),
         "FAILED at seq 4: entry 4 is missing: deleted"),
        (lambda log: log.sql("UPDATE audit SET seq = 1000 WHERE seq = 6",
                             "UPDATE audit SET seq = 6 WHERE seq = 7",
                             "UPDATE audit SET seq = 7 WHERE seq = 1000"),
         "FAILED at seq 6: entries 6 and 7 were swapped"),
        (lambda log: log.sql("DELETE FROM audit WHERE seq > 6"),
         "FAILED at seq 7: the log ends at seq 6 but a signed checkpoint covers 10 entries"),
    ],
    ids=["edit", "delete", "swap", "truncate"],
)  # fmt: skip
def test_each_tampering_is_named(signed, tamper, expected):
    tamper(signed)
    code, output = signed.verify()
    assert code == 1 and output.startswith(expected), output


def test_truncating_after_deleting_the_checkpoints_and_their_copy_is_named(signed):
    """The attack of the issue: no checkpoint left to contradict the shorter log. An hour of
    entries that no checkpoint covers is evidence by itself; the witness names exactly what."""
    signed.sql("DELETE FROM checkpoints", "DELETE FROM audit WHERE seq > 6")
    (signed.path / "audit-checkpoints.jsonl").unlink()
    code, output = signed.verify()
    assert code == 1, output
    assert output.startswith(
        "FAILED at seq 1: entries 1 to 6 are not covered by a signed checkpoint"
    )
    assert "no checkpoint covers any of them" in output
    code, output = signed.verify("--witness", "openbao")
    assert code == 1 and output.startswith(
        f"FAILED at seq 2: the checkpoint of size 2 witnessed by openbao:secret/data/"
        f"{signed.witness_path}"
    ), output
    assert "is missing from the local log" in output
    assert "also: at seq 1: entries 1 to 6 are not covered" in output


def test_a_checkpoint_deleted_between_two_others_is_named_by_the_next_one(signed):
    signed.forget_checkpoint(5)
    code, output = signed.verify()
    assert code == 1 and output.startswith(
        "FAILED at seq 5: the checkpoint of size 5 is missing: the checkpoint of size 8"
    ), output


def test_the_newest_checkpoint_far_older_than_the_newest_entries_is_named(signed):
    signed.forget_checkpoint(10)
    code, output = signed.verify()
    assert code == 1 and output.startswith("FAILED at seq 9: entries 9 to 10 are not covered")
    assert "the newest checkpoint (size 8) is older than them" in output


def test_a_log_younger_than_one_interval_owes_no_checkpoint(tmp_path, openbao, vault_setup):
    log = Log(tmp_path, openbao)
    with log.store.transaction() as tx:
        tx.append(isoformat(utcnow()), "step", ALICE, None, {"n": 1})
    assert log.verify() == (0, "ok: 1 entries, chain intact, no signed checkpoint covers it yet")


def test_re_signing_with_a_key_file_instead_of_the_transit_key_is_named(signed):
    """Whoever holds the host rewrites entry 3, recomputes the chain and signs it again with a
    key of their own, left where the v1 key file lived."""
    rechain(signed, 3, lambda entry: entry["data"].update(n=33))
    forger = Ed25519PrivateKey.generate()
    (signed.path / "audit-signing.key").write_bytes(
        forger.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    signed.sql("DELETE FROM checkpoints")
    (signed.path / "audit-checkpoints.jsonl").unlink()
    for size in SIGNED_AT:
        entry = signed.entry(size)
        signed.store.add_checkpoint(audit.sign_checkpoint(forger, size, entry["hash"], entry["at"]))
    code, output = signed.verify()
    expected = (
        f"FAILED at seq 2: checkpoint of size 2: signed by key {audit.key_id(forger.public_key())}"
        ", a key file that no checkpoint of the transit key vouches for"
    )
    assert code == 1 and output.startswith(expected), output


def test_re_signing_with_another_transit_key_is_named(signed, openbao):
    rechain(signed, 3, lambda entry: entry["data"].update(n=33))
    openbao.client().secrets.transit.create_key("mallory", key_type="ed25519")
    mallory = TransitCheckpointSigner(openbao.client(), key_name="mallory")
    signed.sql("DELETE FROM checkpoints")
    (signed.path / "audit-checkpoints.jsonl").unlink()
    previous = 0
    for size in SIGNED_AT:
        entry = signed.entry(size)
        fields = {"size": size, "head": entry["hash"], "at": entry["at"], "previous": previous}
        signed.store.add_checkpoint(mallory.sign(fields))
        previous = size
    code, output = signed.verify()
    assert code == 1 and output.startswith(
        "FAILED at seq 2: checkpoint of size 2: signed by key transit:mallory:v1, not by "
        f"transit:{AUDIT_KEY}:v1"
    ), output


def test_a_rewrite_re_signed_with_the_broker_token_is_caught_by_the_witness(signed):
    """The broker's token can sign: whoever holds the host can rewrite entries 9 and 10 and have
    transit sign the result. The local log is then consistent; the witness is not fooled."""
    rechain(signed, 9, lambda entry: entry["data"].update(n=99))
    signed.forget_checkpoint(10)
    signed.log._newest = None
    signed.log.witness = None
    signed.moment[0] = utcnow()
    signed.log.checkpoint()
    assert signed.verify()[0] == 0
    code, output = signed.verify("--witness", "openbao")
    assert code == 1 and output.startswith(
        "FAILED at seq 10: entry 10 is not the one the checkpoint of size 10 witnessed by"
    ), output
    assert "another head for the same size" in output


def test_a_witness_holding_a_checkpoint_the_log_lost_is_reported(signed):
    signed.forget_checkpoint(10)
    code, output = signed.verify("--witness", "openbao")
    assert code == 1 and output.startswith(
        f"FAILED at seq 10: the checkpoint of size 10 witnessed by openbao:secret/data/"
        f"{signed.witness_path}"
    ), output
    assert "is missing from the local log: checkpoints were deleted" in output


def test_a_log_shorter_than_a_witnessed_size_is_reported(signed):
    signed.forget_checkpoint(10)
    signed.forget_checkpoint(8)
    signed.sql("DELETE FROM audit WHERE seq > 5")
    code, output = signed.verify("--witness", "openbao")
    assert code == 1 and output.startswith(
        "FAILED at seq 6: the log ends at seq 5, but the checkpoint of size 8 witnessed by"
    ), output


# --- rotation, bundles, pinned keys -------------------------------------------------------------


def test_a_rotation_mid_log_verifies_online_and_offline(tmp_path, openbao, vault_setup):
    log = Log(tmp_path, openbao)
    log.write(range(1, 6))
    openbao.client().secrets.transit.rotate_key(AUDIT_KEY)
    log.log.signer._read = None  # the broker reads the key's versions again within 30 s
    log.write(range(6, 11))
    versions = [c["key_version"] for c in log.store.checkpoints()]
    assert versions[0] < versions[-1] and len(set(versions)) == 2
    assert log.verify("--witness", "openbao")[0] == 0

    bundle = tmp_path / "bundle.zip"
    result = CliRunner().invoke(jit, ["audit", "export", "-o", str(bundle)], env=log.env())
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(bundle) as opened:
        keys = json.loads(opened.read("keys.json"))
    assert sorted(k["key_id"] for k in keys) == sorted(
        {f"transit:{AUDIT_KEY}:v{v}" for v in versions}
    )
    elsewhere = tmp_path.parent / f"auditor-{uuid.uuid4().hex}"
    elsewhere.mkdir()
    shutil.copy(bundle, elsewhere / "bundle.zip")  # no database, no OpenBao there
    result = CliRunner().invoke(jit, ["audit", "verify", "--bundle", str(elsewhere / "bundle.zip")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: 10 entries, chain intact, signed through seq 10")

    # The auditor pinned both versions' keys: fine; only the older one: the newer is named.
    pems = []
    for key in keys:
        pem = elsewhere / f"{key['key_id'].replace(':', '-')}.pem"
        pem.write_text(key["public_key_pem"])
        pems.append(pem)
    both = [arg for pem in pems for arg in ("--public-key", str(pem))]
    bundle_args = ["audit", "verify", "--bundle", str(elsewhere / "bundle.zip")]
    assert CliRunner().invoke(jit, [*bundle_args, *both]).exit_code == 0
    older = f"transit-{AUDIT_KEY}-v{min(versions)}.pem"
    result = CliRunner().invoke(jit, [*bundle_args, "--public-key", str(elsewhere / older)])
    assert result.exit_code == 1
    assert result.output.startswith(
        f"FAILED at seq 8: checkpoint of size 8: signed by key transit:{AUDIT_KEY}:v{max(versions)}"
    ), result.output


def test_a_bundle_with_unreadable_keys_is_one_readable_error(signed, tmp_path):
    bundle = tmp_path / "bundle.zip"
    CliRunner().invoke(jit, ["audit", "export", "-o", str(bundle)], env=signed.env())
    with zipfile.ZipFile(bundle) as source:
        members = {name: source.read(name) for name in source.namelist()}
    members["keys.json"] = b'[{"key_id": "x", "public_key_pem": "not a key"}]'
    with zipfile.ZipFile(bundle, "w") as target:
        for name, content in members.items():
            target.writestr(name, content)
    result = CliRunner().invoke(jit, ["audit", "verify", "--bundle", str(bundle)])
    assert result.exit_code == 1 and result.output.startswith("Error: the bundle's keys cannot")


def test_an_ecdsa_transit_key_signs_checkpoints_too(tmp_path, openbao, vault_setup):
    openbao.client().secrets.transit.create_key("audit-p256", key_type="ecdsa-p256")
    log = Log(tmp_path, openbao, TransitCheckpointSigner(openbao.client(), key_name="audit-p256"))
    log.write(range(1, 11))
    assert log.store.checkpoints()[0]["key_id"] == "transit:audit-p256:v1"
    assert log.verify(JIT_AUDIT_TRANSIT_KEY="audit-p256") == (
        0,
        "ok: 10 entries, chain intact, signed through seq 10",
    )


# --- from the v1 key file to transit ------------------------------------------------------------


def test_a_log_signed_by_the_v1_key_file_is_taken_over_by_transit(tmp_path, openbao, vault_setup):
    """The migration: the old checkpoints still verify under the key file, the first transit
    checkpoint names that key (so a key file made later vouches for nothing), and signing goes
    on through transit."""
    key = audit.load_or_create_key(tmp_path / "audit-signing.key")
    old = Log(tmp_path, openbao, signer=key)
    old.log.witness = None
    old.write(range(1, 6), sign_at=(1, 2, 3, 4, 5))  # v1 names no previous: every interval
    assert audit.signing.is_legacy(old.store.checkpoints()[-1])

    new = Log(tmp_path, openbao)
    new.log.extra_keys = audit.signing.legacy_keyring(tmp_path / "audit-signing.key")
    new.moment[0] = utcnow() - timedelta(minutes=29)
    migration = new.log.checkpoint()
    assert (migration["size"], migration["previous"]) == (5, 5)
    assert migration["legacy_key_id"] == audit.key_id(key.public_key())
    new.write(range(6, 11), sign_at=(8, 10))
    assert new.verify("--witness", "openbao") == (
        0,
        "ok: 10 entries, chain intact, signed through seq 10",
    )
    # Without OpenBao (no token) the transit checkpoints cannot be checked: said, not passed.
    code, output = new.verify(JIT_VAULT_TOKEN="", JIT_AUDIT_WITNESS_KV="")
    assert code == 1 and output.startswith("FAILED at seq 5: checkpoint of size 5: signed by key "
                                           f"transit:{AUDIT_KEY}:v")  # fmt: skip
    # A bundle carries both keys: offline, the whole log verifies.
    bundle = tmp_path / "bundle.zip"
    assert (
        CliRunner().invoke(jit, ["audit", "export", "-o", str(bundle)], env=new.env()).exit_code
        == 0
    )
    assert str(verify_bundle(bundle)) == "ok: 10 entries, chain intact, signed through seq 10"
    # A key file made later and put in place of the old one vouches for nothing, and the old
    # checkpoints no longer verify: both are named.
    (tmp_path / "audit-signing.key").unlink()
    forged = audit.load_or_create_key(tmp_path / "audit-signing.key")
    new.store.add_checkpoint(
        audit.sign_checkpoint(forged, 4, new.entry(4)["hash"], new.entry(4)["at"])
    )
    code, output = new.verify()
    original, made_later = audit.key_id(key.public_key()), audit.key_id(forged.public_key())
    expected = f"FAILED at seq 1: checkpoint of size 1: signed by key {original}, not by"
    assert code == 1 and output.startswith(expected), output
    assert (
        f"at seq 4: checkpoint of size 4: signed by key {made_later}, a key file that no "
        "checkpoint of the transit key vouches for"
    ) in output


# --- malformed witnesses ------------------------------------------------------------------------


def test_a_witness_file_that_is_not_json_is_one_readable_error(signed, tmp_path):
    junk = tmp_path / "siem.jsonl"
    junk.write_text('{"checkpoints": []}\nnot json\n')
    code, output = signed.verify("--witness", str(junk))
    assert code == 1 and output == f"Error: line 2 of {junk} is not JSON"
    junk.write_text('{"size": "ten"}\n')
    code, output = signed.verify("--witness", str(junk))
    assert code == 1 and output == f"Error: checkpoint 1 of {junk} is not a checkpoint"


def test_a_witness_version_that_is_not_a_checkpoint_is_one_readable_error(signed, openbao):
    openbao.client().secrets.kv.v2.create_or_update_secret(
        signed.witness_path, secret={"checkpoint": {"size": 3}}
    )
    code, output = signed.verify("--witness", "openbao")
    assert code == 1 and output.startswith("Error: checkpoint 5 of openbao:secret/data/")


# --- the grants table against the chain --------------------------------------------------------


def run_verify(app, token):
    settings = app.extensions["jit"].settings
    env = {"JIT_CONFIG": "", "JIT_SERVER_DATA_DIR": str(settings.data_dir),
           "JIT_VAULT_ADDR": settings.vault["addr"], "JIT_VAULT_TOKEN": token,
           "JIT_STORAGE_URL": settings.storage["url"]}  # fmt: skip
    result = CliRunner().invoke(jit, ["audit", "verify"], env=env)
    return result.exit_code, result.output.strip()


def test_grant_rows_that_disagree_with_their_chain_are_named(make_app, api_for, openbao):
    app = make_app(policy_text=APPROVAL_POLICY)
    services = app.extensions["jit"]
    api = api_for(app)
    done = api("POST", "/api/v1/requests", {"entitlement": "stretchy", "reason": "fix it",
                                            "duration": "5m"}).json["id"]  # fmt: skip
    assert api("POST", f"/api/v1/requests/{done}/release").status_code == 200
    services.grants.reap_due()
    body = {"entitlement": "db-admin", "reason": "INC-1 fix", "ticket": "INC-1", "duration": "5m"}
    waiting = api("POST", "/api/v1/requests", body).json["id"]
    store = services.grants.store
    assert store.get_grant(done).status == "revoked"
    services.audit_log.checkpoint()
    assert run_verify(app, openbao.broker_token)[0] == 0  # an untouched broker's table agrees

    store.db.execute("UPDATE grants SET status = 'active' WHERE id = ?", [done])
    store.db.execute(
        "INSERT INTO approvals (grant_id, issuer, subject, display, groups, at, email) "
        "VALUES (?, 'https://idp', 'mallory', 'Mallory', '[]', '2026-01-01T00:00:00Z', '')",
        [waiting],
    )
    code, output = run_verify(app, openbao.broker_token)
    assert code == 1 and output.startswith("FAILED: grant "), output
    assert (
        f"grant {done}: status is active, but its chain records the release and every "
        "credential verified gone (revoked)"
    ) in output
    assert (
        f"grant {waiting}: approvals: mallory (https://idp) approved in the table, but no "
        "approval entry of the chain records it"
    ) in output


def test_a_window_end_and_a_handle_changed_in_the_table_are_named(make_app, api_for, openbao):
    app = make_app(policy_text=APPROVAL_POLICY)
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", {"entitlement": "stretchy", "reason": "fix it",
                                                "duration": "5m"}).json["id"]  # fmt: skip
    assert api("POST", f"/api/v1/requests/{grant_id}/extend", {"duration": "5m"}).status_code == 200
    store = app.extensions["jit"].grants.store
    store.db.execute(
        "UPDATE grants SET window_end = '2099-01-01T00:00:00Z', handle = 'other' WHERE id = ?",
        [grant_id],
    )
    code, output = run_verify(app, openbao.broker_token)
    assert code == 1, output
    assert f"grant {grant_id}: window end is 2099-01-01T00:00:00Z, but its chain says" in output
    assert f"grant {grant_id}: credential handle is not the one its chain records" in output


# --- outages never block issuing or removal; the backlog is signed and witnessed later ----------


def test_signing_and_witness_outages_never_block_issuing_or_removal(make_app, api_for):
    dead = f"http://127.0.0.1:{free_port()}"
    app = make_app(
        audit={"transit_key": "not-made-yet", "witness_kv": "secret/jit-broker/audit-checkpoints",
               "forward_url": dead + "/siem"},
        reaper={"enabled": True},
    )  # fmt: skip
    services = app.extensions["jit"]
    audit_log = services.audit_log
    api = api_for(app)
    grant_id = api("POST", "/api/v1/requests", {"entitlement": "kv-read", "reason": "x",
                                                "duration": "5m"}).json["id"]  # fmt: skip
    assert api("POST", f"/api/v1/requests/{grant_id}/release").status_code == 200
    assert wait_until(lambda: services.grants.store.get_grant(grant_id).status == "revoked", 20)
    assert audit_log.checkpoint() is None  # the token may not sign with that key

    status, body = health(app)
    assert status == 200 and body["status"] == "degraded", body
    check = body["checks"]["checkpoints"]
    assert not check["ok"] and "checkpoints" in body["alerts"]
    assert check["unsigned"] == check["head"] > 0
    assert "may not use transit/keys/not-made-yet" in check["error"]

    # The key is fixed; the witness is down meanwhile: the backlog is signed, not witnessed.
    audit_log.signer.key_name = AUDIT_KEY
    audit_log.signer._read = None
    kv = audit_log.witness.client
    audit_log.witness.client = type(kv)(url=dead, token="x", timeout=2)
    signed = audit_log.checkpoint()
    assert signed["size"] == services.grants.store.audit_head()["seq"]
    status, body = health(app)
    check = body["checks"]["checkpoints"]
    assert status == 200 and not check["ok"] and check["unsigned"] == 0
    assert "refused the checkpoint: ConnectionError" in check["witness"]["error"]
    # The witness is back: what it lacks is written at the next checkpoint.
    audit_log.witness.client = kv
    audit_log.checkpoint()
    assert health(app)[1]["checks"]["checkpoints"]["witness"]["witnessed_size"] == signed["size"]


def test_the_siem_receives_every_checkpoint_and_witnesses_the_log(signed, tmp_path):
    siem = HttpReceiver()
    try:
        forwarder = audit.forward.Forwarder(signed.store, siem.url, batch=4)
        while forwarder.forward_once():
            pass
        forwarder.forward_once()
    finally:
        siem.stop()
    received = [c for body in siem.accepted for c in body.get("checkpoints", [])]
    assert [c["size"] for c in received] == list(SIGNED_AT)
    for body in siem.accepted:  # each checkpoint travels with (or after) the entries it covers
        if body.get("checkpoints") and body["entries"]:
            assert body["checkpoints"][-1]["size"] <= body["entries"][-1]["seq"]
    kept = tmp_path / "siem.jsonl"
    kept.write_text("".join(json.dumps(body) + "\n" for body in siem.accepted))
    assert signed.verify("--witness", str(kept))[0] == 0
    signed.forget_checkpoint(8)
    code, output = signed.verify("--witness", str(kept))
    assert code == 1 and output.startswith(
        f"FAILED at seq 8: the checkpoint of size 8 witnessed by {kept}"
    ), output


def test_readyz_names_the_checkpoint_key_when_signing_works(make_app):
    app = make_app()
    with app.extensions["jit"].audit_log.store.transaction() as tx:
        tx.append(isoformat(utcnow()), "test", ALICE, None, {})
    app.extensions["jit"].audit_log.checkpoint()
    check = health(app)[1]["checks"]["checkpoints"]
    assert check["ok"] and check["key"].startswith(f"transit:{AUDIT_KEY}:v"), check
    assert check["unsigned"] == 0 and check["type"] == "ed25519"


def test_a_bundle_from_a_tampered_log_can_still_be_checked_offline(signed, tmp_path):
    signed.sql("""UPDATE audit SET data = '{"n":42}' WHERE seq = 3""")
    bundle = tmp_path / "b.zip"
    assert (
        CliRunner().invoke(jit, ["audit", "export", "-o", str(bundle)], env=signed.env()).exit_code
        == 0
    )
    result = verify_bundle(bundle)
    assert not result.ok and result.bad_seq == 3
