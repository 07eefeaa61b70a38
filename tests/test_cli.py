"""`jit audit` on a real database file: intact, tampered with, missing; a broken config."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from broker.cli import main as jit
from broker.models import Grant, isoformat, utcnow
from tests.helpers import STORE

STEPS = ["request", "decision", "issue", "release", "revoke", "verify"]


@pytest.fixture
def database(make_store):
    """One grant's whole life, written just now (younger than one checkpoint interval, so no
    checkpoint is owed yet), with the row its chain says."""
    store = make_store()
    store.migrate()
    now = isoformat(utcnow())
    said = {"issue": {"handle": "hmac-sha256:h"}, "release": {"window_end": now},
            "verify": {"handle": "hmac-sha256:h", "gone": True}}  # fmt: skip
    for n, step in enumerate(STEPS):
        with store.transaction() as tx:
            tx.append(now, step, {"iss": "i", "sub": "alice"}, "g1", {"n": n, **said.get(step, {})})
    with store.transaction() as tx:
        tx.insert_grant(Grant("g1", "i", "alice", "alice", "kv-read", "x", 60, "revoked", now,
                              now, now, "vault_token", "sha256:p"))  # fmt: skip
    return store


def invoke(database, *args):
    env = {"JIT_STORAGE_URL": database.url} if STORE == "postgres" else {}
    env.setdefault("JIT_STORAGE_PATH", str(getattr(database, "path", "")))
    return CliRunner().invoke(jit, list(args), env=env)


def test_verify_an_intact_chain(database):
    result = invoke(database, "audit", "verify")
    assert result.exit_code == 0
    assert result.output.strip().startswith("ok: 6 entries, chain intact"), result.output


def test_verify_names_the_edited_entry(database):
    database.db.execute("""UPDATE audit SET data = '{"n":42}' WHERE seq = 3""")
    result = invoke(database, "audit", "verify")
    assert result.exit_code == 1
    assert "FAILED at seq 3" in result.output and "edited" in result.output


def test_verify_names_the_deleted_entry(database):
    database.db.execute("DELETE FROM audit WHERE seq = 2")
    result = invoke(database, "audit", "verify")
    assert result.exit_code == 1
    assert "FAILED at seq 2" in result.output


def test_show_prints_the_grants_chain_in_order(database):
    result = invoke(database, "audit", "show", "g1")
    assert result.exit_code == 0
    steps = [line.split()[2] for line in result.output.splitlines()]
    assert steps == STEPS


def test_show_an_unknown_grant_is_an_error(database):
    result = invoke(database, "audit", "show", "nope")
    assert result.exit_code == 1
    assert "no audit entries for grant nope" in result.output


def test_a_missing_database_is_an_error_not_an_empty_chain(tmp_path):
    result = CliRunner().invoke(
        jit, ["audit", "verify"], env={"JIT_STORAGE_PATH": str(tmp_path / "none.db")}
    )
    assert result.exit_code == 1
    assert "no broker database" in result.output
    assert not (tmp_path / "none.db").exists()


def test_a_broken_config_is_one_readable_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[vault]\ntokn = 'x'\n")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from broker.cli import run; run()",
            "-c",
            str(config),
            "audit",
            "verify",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"jit: {config}: unknown setting vault.tokn"


def test_a_database_server_out_of_reach_is_one_readable_line(tmp_path):
    """`[storage] url` naming a PostgreSQL server nobody answers at: exit 1, no traceback."""
    from scripts.launchers import free_port

    url = f"postgresql://jit:secret@127.0.0.1:{free_port()}/jit"
    result = subprocess.run(
        [sys.executable, "-c", "from broker.cli import run; run()", "audit", "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JIT_STORAGE_URL": url, "JIT_SERVER_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the pool's own warnings, if any
    assert last.startswith("jit: the broker's database cannot be used now"), result.stderr
    assert "Traceback" not in result.stderr and "secret" not in result.stderr
