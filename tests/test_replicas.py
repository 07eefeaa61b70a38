"""Several brokers on one store, on whichever store the suite runs (JIT_TEST_STORE): two brokers
in this process (each its own connections: a pool each on PostgreSQL) and one more as a separate
process, reaping hundreds of windows that end together: each grant claimed, revoked and verified
exactly once, one chain; a reaper paused past its claim records nothing over the next claim's
work (the fence); brokers starting together on an empty database create the schema once; and on
PostgreSQL a release on one replica wakes the others' reapers at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta

from click.testing import CliRunner

from broker import audit
from broker.cli import main as jit
from broker.grants.base import REVOCATION_LEASE, TAKEOVER_CHECK
from broker.models import parse_time, utcnow
from broker.store import SCHEMA_VERSION
from tests.helpers import (
    ALICE,
    STORE,
    broker_sections,
    postgres_only,
    token_works,
    types,
    wait_for_status,
)

GRANTS = 300


def config_file(tmp_path, openbao, oidc_provider, broker_port, client_secret):
    """The config of a broker process on the data directory (and database) of `make_app`."""
    sections = broker_sections(tmp_path, openbao, oidc_provider, broker_port, client_secret)
    sections["reaper"] = {"enabled": False}
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    config = tmp_path / "jit.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


# A broker process that reaps with four threads at once, when told to (a line on stdin).
REAPING_BROKER = """
import sys, threading
from broker import create_app
from broker.config import load_settings
from broker.models import parse_time

jit = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"]
end = parse_time(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=jit.grants.reap_due, args=(end,)) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
jit.stop()
print("done", flush=True)
"""


def test_replicas_reaping_hundreds_of_windows_closing_together_revoke_each_once(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    one = make_app().extensions["jit"].grants
    two = make_app().extensions["jit"].grants  # a second broker on the same store
    start = utcnow()
    one.clock = lambda: start  # every window starts, and so ends, in the same second
    issued = [one.request(ALICE, "kv-read", "10m", f"replicas {i}") for i in range(GRANTS)]
    (end,) = {grant.window_end for grant, _ in issued}
    config = config_file(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret)
    three = subprocess.Popen(
        [sys.executable, "-c", REAPING_BROKER, str(config), end],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert three.stdout.readline().strip() == "ready", three.stderr.read()
        reapers = [
            threading.Thread(target=grants.reap_due, args=(parse_time(end),))
            for grants in (one, two, one, two, one, two)
        ]
        three.stdin.write("go\n")
        three.stdin.flush()
        for reaper in reapers:
            reaper.start()
        for reaper in reapers:
            reaper.join(120)
        out, err = three.communicate(timeout=120)
        assert three.returncode == 0 and out.strip() == "done", err
    finally:
        if three.poll() is None:
            three.kill()

    for grant, _ in issued:
        reaped = one.store.get_grant(grant.id)
        assert (reaped.status, reaped.attempts) == ("revoked", 1), grant.id  # claimed once
        steps = types(one, grant.id)
        assert steps == ["request", "decision", "issue", "expire", "revoke", "verify"], steps
    for _, credential in issued[:: GRANTS // 15]:
        assert not token_works(openbao, credential.secret)
    entries = list(one.store.audit_entries())
    assert [entry["seq"] for entry in entries] == list(range(1, len(entries) + 1))
    assert audit.verify(entries).ok  # one chain: no fork, no gap
    env = {"JIT_CONFIG": str(config)}
    verified = CliRunner().invoke(jit, ["audit", "verify"], env=env)
    assert verified.exit_code == 0 and "chain intact" in verified.output, verified.output


def test_a_reaper_paused_past_its_claim_records_nothing_over_the_next_claims_work(
    make_app, openbao
):
    """Replica A claims a released grant and stalls in Vault's revoke (GC, SIGSTOP, a network
    stall) past REVOCATION_LEASE; replica B takes the claim over and finishes. When A goes on, its
    finish is fenced off by the claim's attempt count: the chain holds B's removal only."""
    a = make_app().extensions["jit"].grants
    b = make_app().extensions["jit"].grants
    grant, credential = a.request(ALICE, "kv-read", "10m", "fenced")
    a.release(ALICE, grant.id)

    backend = a.backends["vault_token"]
    in_vault, go_on = threading.Event(), threading.Event()
    revoke = backend.revoke

    def stalled_revoke(handle):
        in_vault.set()
        assert go_on.wait(60)
        return revoke(handle)

    backend.revoke = stalled_revoke
    paused = threading.Thread(target=a.reap_due)
    paused.start()
    try:
        assert in_vault.wait(30)
        claimed = a.store.get_grant(grant.id)
        assert (claimed.status, claimed.attempts) == ("revoking", 1)
        assert claimed.issuing_process == a.process_id  # the claim's holder
        # B leaves a live replica's claim alone, but looks again soon, in case A dies.
        now = utcnow()
        next_look = b.reap_due(now)
        assert next_look <= now + TAKEOVER_CHECK
        assert b.store.get_grant(grant.id).attempts == 1

        later = utcnow() + REVOCATION_LEASE + timedelta(seconds=5)  # A's claim has lapsed
        b.reap_due(later)
        taken_over = b.store.get_grant(grant.id)
        assert (taken_over.status, taken_over.attempts) == ("revoked", 2)
    finally:
        go_on.set()
        paused.join(60)

    final = a.store.get_grant(grant.id)
    assert (final.status, final.attempts) == ("revoked", 2)
    removals = [e for e in a.chain(grant.id) if e["type"] in ("revoke", "verify")]
    assert [(e["type"], e["data"]["attempt"]) for e in removals] == [("revoke", 2), ("verify", 2)]
    assert not token_works(openbao, credential.secret)
    assert audit.verify(a.store.audit_entries()).ok


# A broker process whose four reaper threads each claim a grant and then hang in Vault's revoke,
# until the test kills it (-9) with its claims held.
STUCK_BROKER = """
import sys, threading
from broker import create_app
from broker.config import load_settings
from broker.models import parse_time

jit = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"]
backend = jit.grants.backends["vault_token"]
lock = threading.Lock()

def hang(handle):
    with lock:
        print("claimed", flush=True)
    threading.Event().wait()

backend.revoke = hang
jit.grants.removal_workers = 1  # one claim per thread below: exactly four held when it dies
for _ in range(4):
    threading.Thread(target=jit.grants.reap_due, args=(parse_time(sys.argv[2]),)).start()
threading.Event().wait()
"""


def test_the_claims_of_a_replica_killed_mid_burst_are_taken_over_at_once(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    """Three replica processes reaping one burst; one is SIGKILLed holding claims. The other two
    take its grants over in the same pass (its liveness lock died with it), long before the
    claims' lease (60 s) would have lapsed: every grant revoked and verified once."""
    one = make_app().extensions["jit"].grants
    start = utcnow()
    one.clock = lambda: start
    issued = [one.request(ALICE, "kv-read", "10m", f"burst {i}") for i in range(120)]
    (end,) = {grant.window_end for grant, _ in issued}
    config = config_file(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret)

    def broker(script):
        return subprocess.Popen(
            [sys.executable, "-c", script, str(config), end],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    stuck, other = broker(STUCK_BROKER), broker(REAPING_BROKER)
    try:
        for _ in range(4):
            assert stuck.stdout.readline().strip() == "claimed", stuck.stderr.read()
        assert other.stdout.readline().strip() == "ready", other.stderr.read()
        held = [g for g, _ in issued if one.store.get_grant(g.id).status == "revoking"]
        assert len(held) == 4
        stuck.kill()  # SIGKILL, claims held
        stuck.wait(30)
        started = time.monotonic()
        other.stdin.write("go\n")
        other.stdin.flush()
        one.reap_due(parse_time(end))
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0 and out.strip() == "done", err
    finally:
        for process in (stuck, other):
            if process.poll() is None:
                process.kill()
    assert time.monotonic() - started < REVOCATION_LEASE.total_seconds() / 2

    for grant, _ in issued:
        reaped = one.store.get_grant(grant.id)
        assert reaped.status == "revoked", grant.id
        assert reaped.attempts == (2 if grant in held else 1), grant.id
        steps = types(one, grant.id)
        assert steps == ["request", "decision", "issue", "expire", "revoke", "verify"], steps
    for _, credential in issued[::10]:
        assert not token_works(openbao, credential.secret)
    assert audit.verify(one.store.audit_entries()).ok


# Brokers starting together: each migrates the store when it is built.
MIGRATING_BROKER = """
import sys
from broker.config import load_settings
from broker.store import open_store

store = open_store(load_settings(sys.argv[1], environ={}))
print("ready", flush=True)
sys.stdin.readline()
store.migrate()
print(store.schema_version(), flush=True)
store.close()
"""


def test_brokers_starting_together_on_an_empty_database_create_the_schema_once(
    tmp_path, make_store, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = config_file(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret)
    brokers = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATING_BROKER, str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for broker in brokers:
            assert broker.stdout.readline().strip() == "ready", broker.stderr.read()
        for broker in brokers:  # as near the same moment as three processes can be told
            broker.stdin.write("go\n")
            broker.stdin.flush()
        for broker in brokers:
            out, err = broker.communicate(timeout=60)
            assert broker.returncode == 0, err
            assert out.strip() == str(SCHEMA_VERSION)
    finally:
        for broker in brokers:
            if broker.poll() is None:
                broker.kill()
    store = make_store()
    assert store.schema_version() == SCHEMA_VERSION
    assert store.db.execute("SELECT count(*) AS n FROM write_check").fetchone()["n"] == 1
    if STORE == "postgres":
        rows = store.db.execute("SELECT count(*) AS n FROM schema_version").fetchone()
        assert rows["n"] == 1


@postgres_only
def test_a_release_on_one_replica_wakes_the_others_reaper_at_once(make_app):
    """Replica B's reaper sleeps until the window's end or its heartbeat (minutes away); replica
    A releases the grant: B hears it (LISTEN/NOTIFY) and removes it within seconds."""
    b = make_app(reaper={"enabled": True, "heartbeat": 600}).extensions["jit"]
    a = make_app().extensions["jit"].grants
    grant, credential = a.request(ALICE, "kv-read", "30m", "wake the others")
    deadline = time.monotonic() + 15
    while b.reaper.last_run is None:  # its first pass done: now it sleeps
        assert time.monotonic() < deadline, "B's reaper never completed a pass"
        time.sleep(0.05)
    assert b.grants.store.get_grant(grant.id).status == "active"

    released_at = time.monotonic()
    a.release(ALICE, grant.id)
    wait_for_status(b.grants, grant.id, "revoked", timeout=10)
    assert time.monotonic() - released_at < 10  # not the heartbeat (600 s), not the window end
    assert types(b.grants, grant.id)[-2:] == ["revoke", "verify"]
