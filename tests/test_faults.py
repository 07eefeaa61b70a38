"""Real faults against real processes: hundreds of windows closing at once, OpenBao stopped while
windows close, the broker down while they close, and the broker SIGKILLed between Vault's answer
and its own record. Every test ends with each credential verified gone, and the chain saying so."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest

from broker import audit, create_app
from broker.errors import GrantConflict
from broker.grants import REAP_BATCH
from broker.models import parse_time, utcnow
from scripts.launchers import OpenBao, free_port
from tests.helpers import (
    ALICE,
    APPROVAL_POLICY,
    LATER,
    broker_sections,
    broker_settings,
    live_tokens_of,
    token_works,
    types,
    verified_gone,
    wait_for_status,
)


def wait_until(moment, timeout=20):
    """Poll the real clock until it is past `moment` (bounded)."""
    deadline = time.monotonic() + timeout
    while utcnow() <= moment:
        assert time.monotonic() < deadline, f"the clock never passed {moment}"
        time.sleep(0.1)


def test_hundreds_of_windows_closing_in_the_same_second_are_all_reaped(make_app, openbao):
    grants = make_app().extensions["jit"].grants
    count = REAP_BATCH + 100  # more than one of the reaper's batches
    start = utcnow()
    grants.clock = lambda: start  # every window starts, and so ends, in the same second
    issued = [grants.request(ALICE, "kv-read", "10m", f"bulk {i}") for i in range(count)]
    (end,) = {grant.window_end for grant, _ in issued}

    assert grants.reap_due(parse_time(end)) is None

    for grant, _ in issued:
        reaped = grants.store.get_grant(grant.id)
        assert (reaped.status, reaped.attempts) == ("revoked", 1), grant.id
        assert verified_gone(grants, grant.id), grant.id
    for _, credential in issued[:: count // 20]:
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok


@pytest.fixture
def own_openbao(tmp_path):
    """An OpenBao of this test's own, to stop and start again; started by the test."""
    servers = []

    def start(port=None, root_token=None, broker_token=None):
        server = OpenBao.start(root_token, port, workdir=tmp_path / f"openbao-{len(servers)}")
        servers.append(server)
        # A token id of our own (OpenBao's own ids cannot be given back), so that a server
        # started again on the same port can make the broker's token again.
        server.make_broker_token(["jit-test-read"], broker_token or secrets.token_urlsafe(24))
        client = server.client()
        client.sys.create_or_update_policy(
            "jit-test-read", 'path "secret/data/test/*" { capabilities = ["read"] }'
        )
        client.secrets.kv.v2.create_or_update_secret("test/app", {"password": "s3cret"})
        return server

    yield start
    for server in servers:
        server.stop()


def test_openbao_down_when_windows_close_then_back_every_grant_ends_revoked(
    tmp_path, own_openbao, oidc_provider, broker_port, oidc_client_secret
):
    bao = own_openbao(port=free_port())
    settings = broker_settings(
        tmp_path / "broker",
        bao,
        oidc_provider,
        broker_port,
        oidc_client_secret,
        reaper={"enabled": False, "retry_min": 5, "retry_max": 60},
    )
    grants = create_app(settings).extensions["jit"].grants
    issued = [grants.request(ALICE, "kv-read", "10m", f"bao goes away {i}") for i in range(3)]
    end = max(parse_time(grant.window_end) for grant, _ in issued)
    assert all(token_works(bao, credential.secret) for _, credential in issued)

    bao.stop()
    grants.reap_due(end)

    retry_at = end + timedelta(seconds=5)
    for grant, _ in issued:
        failed = grants.store.get_grant(grant.id)
        assert (failed.status, failed.attempts) == ("revoke_failed", 1)
        assert parse_time(failed.due_at) == retry_at  # backed off, not given up
        assert types(grants, grant.id)[-4:] == ["expire", "revoke", "verify", "revoke_failed"]
        assert grants.chain(grant.id)[-2]["data"]["gone"] is False
    assert grants.reap_due(end + timedelta(seconds=1)) == retry_at  # not retried before its time

    # A dev server keeps everything in memory: the OpenBao that answers now, on the same address
    # with the same root token (and the broker's token made again), has never heard of these
    # tokens. That is the honest answer to "does this credential still exist?": the old server
    # and every token it issued died with the process, so nothing can use them; the verify
    # records what the Vault that answers says.
    back = own_openbao(
        port=int(bao.addr.rsplit(":", 1)[1]),
        root_token=bao.root_token,
        broker_token=bao.broker_token,
    )
    assert back.addr == bao.addr
    grants.reap_due(retry_at)

    for grant, credential in issued:
        revoked = grants.store.get_grant(grant.id)
        assert (revoked.status, revoked.attempts, revoked.last_error) == ("revoked", 2, "")
        chain = grants.chain(grant.id)
        attempts = [e["data"]["attempt"] for e in chain if e["type"] == "verify"]
        assert attempts == [1, 2]
        assert [e["data"]["gone"] for e in chain if e["type"] == "verify"] == [False, True]
        assert not token_works(back, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok


def test_windows_that_closed_while_the_broker_was_down_are_reaped_at_start(make_app, openbao):
    grants = make_app().extensions["jit"].grants  # broker A, no reaper: its windows pass unseen
    issued = [grants.request(ALICE, "kv-read", "3s", f"broker down {i}") for i in range(5)]
    end = max(parse_time(grant.window_end) for grant, _ in issued)
    del grants
    wait_until(end)

    restarted = make_app(reaper={"enabled": True})  # broker B: the same data directory
    grants = restarted.extensions["jit"].grants
    try:
        for grant, credential in issued:
            reaped = wait_for_status(grants, grant.id, "revoked", timeout=20)
            assert reaped.attempts == 1
            assert verified_gone(grants, grant.id)
            assert not token_works(openbao, credential.secret)
        assert audit.verify(grants.store.audit_entries()).ok
    finally:
        restarted.extensions["jit"].stop()


# The crash: a real broker process runs its own request path (policy, the recorded intent, the
# Vault call). The only thing the test adds is the fault: the moment Vault has answered, the
# process prints what Vault gave it and is SIGKILLed, before the broker can record it.
CRASHING_BROKER = """
import json, os, signal, sys
from broker import create_app
from broker.config import load_settings
from broker.models import Principal

grants = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"].grants
backend = grants.backends["vault_token"]
vault_issue = backend.issue

def issue_then_die(grant_id, *args, **kwargs):
    credential = vault_issue(grant_id, *args, **kwargs)
    print(json.dumps({"grant_id": grant_id, "secret": credential.secret}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

backend.issue = issue_then_die
alice = Principal("https://idp", "alice", groups=("engineers",), email="alice@example.com")
if len(sys.argv) > 2:  # extend this grant instead
    grants.extend(alice, sys.argv[2], "5m")
else:
    grants.request(alice, "kv-read", "1h", "crash test")
print("still alive", flush=True)
"""


def toml(sections: dict) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def crash_config(
    make_app, tmp_path, openbao, oidc_provider, broker_port, client_secret, policy_text=""
):
    """The config file of a broker subprocess on the data directory `make_app` uses."""
    # The data directory, its keys and the policy file, as the next app will see them.
    make_app(policy_text=policy_text)
    config = tmp_path / "jit.toml"
    sections = broker_sections(tmp_path, openbao, oidc_provider, broker_port, client_secret)
    config.write_text(toml({**sections, "reaper": {"enabled": False}}))
    return config


def test_a_broker_killed_between_vault_and_its_record_leaves_nothing_behind(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret
    )
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_BROKER, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == -9, crashed.stderr
    said = json.loads(crashed.stdout.splitlines()[0])
    assert "still alive" not in crashed.stdout
    assert token_works(openbao, said["secret"])  # Vault issued it; nobody recorded it

    grants = make_app().extensions["jit"].grants  # the broker, restarted
    assert grants.store.get_grant(said["grant_id"]).status == "issuing"
    assert types(grants, said["grant_id"]) == ["request", "decision"]  # the intent, recorded
    (finding,) = grants.reconcile(now=utcnow() + LATER)

    assert finding["grant_id"] == said["grant_id"]
    assert finding["gone"] and finding["accepted"] and finding["grant_status"] == "issuing"
    assert not token_works(openbao, said["secret"])
    failed = grants.store.get_grant(said["grant_id"])
    assert failed.status == "issue_failed" and "left issuing" in failed.last_error
    assert types(grants, said["grant_id"]) == ["request", "decision", "issue_failed", "reconcile"]
    assert audit.verify(grants.store.audit_entries()).ok
    assert grants.reconcile(now=utcnow() + LATER) == []


# Several issuances in flight at the moment of the crash: `answered` of them have Vault's token,
# the others are recorded `issuing` and still waiting for Vault. When all are there, SIGKILL.
CRASHING_BROKER_IN_FLIGHT = """
import json, os, signal, sys, threading
from broker import create_app
from broker.config import load_settings
from broker.models import Principal

answered, waiting = int(sys.argv[2]), int(sys.argv[3])
grants = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"].grants
backend = grants.backends["vault_token"]
vault_issue = backend.issue
all_there = threading.Barrier(answered + waiting)
calls = iter(range(answered + waiting))
lock = threading.Lock()

def issue_then_die(grant_id, *args, **kwargs):
    with lock:
        before_vault = next(calls) >= answered
    secret = None if before_vault else vault_issue(grant_id, *args, **kwargs).secret
    with lock:
        print(json.dumps({"grant_id": grant_id, "secret": secret}), flush=True)
    if all_there.wait() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()

backend.issue = issue_then_die
alice = Principal("https://idp", "alice", groups=("engineers",), email="alice@example.com")
for i in range(answered + waiting):
    threading.Thread(target=grants.request, args=(alice, "kv-read", "1h", f"crash {i}")).start()
"""


def crash_with_issuances_in_flight(config, answered: int, waiting: int) -> list[dict]:
    """Run CRASHING_BROKER_IN_FLIGHT to its SIGKILL; what it said of each issuance in flight:
    {"grant_id", "secret"} (secret None where Vault had not answered)."""
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_BROKER_IN_FLIGHT, str(config), str(answered), str(waiting)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == -9, crashed.stderr
    return [json.loads(line) for line in crashed.stdout.splitlines()]


def test_issuances_in_flight_when_a_broker_is_killed_are_settled_as_soon_as_one_starts(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret
    )
    said = crash_with_issuances_in_flight(config, answered=4, waiting=2)
    issued = [each for each in said if each["secret"]]
    unanswered = [each for each in said if not each["secret"]]
    assert (len(issued), len(unanswered)) == (4, 2)
    assert all(token_works(openbao, each["secret"]) for each in issued)  # live, unrecorded

    # A new broker on the same data, its reaper running as in production: no grace period
    # for a process that is dead, so its first pass settles everything, within seconds.
    restarted = make_app(reaper={"enabled": True})
    grants = restarted.extensions["jit"].grants
    try:
        for each in said:
            wait_for_status(grants, each["grant_id"], "issue_failed", timeout=15)
        for each in issued:
            assert not token_works(openbao, each["secret"])
            assert types(grants, each["grant_id"]) == [
                "request",
                "decision",
                "issue_failed",
                "reconcile",
            ]
            (found,) = [e for e in grants.chain(each["grant_id"]) if e["type"] == "reconcile"]
            assert found["data"]["gone"] and found["data"]["method"]
            assert "left issuing" in grants.store.get_grant(each["grant_id"]).last_error
        for each in unanswered:
            assert types(grants, each["grant_id"]) == ["request", "decision", "issue_failed"]
            assert "before Vault issued" in grants.store.get_grant(each["grant_id"]).last_error
        assert audit.verify(grants.store.audit_entries()).ok
    finally:
        restarted.extensions["jit"].stop()


# A live broker process with an issuance in flight: Vault has answered, and the process waits
# (for the test's word on stdin) before recording it, as a slow request would.
SLOW_BROKER = """
import json, sys
from broker import create_app
from broker.config import load_settings
from broker.models import Principal

grants = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"].grants
backend = grants.backends["vault_token"]
vault_issue = backend.issue

def issue_slowly(grant_id, *args, **kwargs):
    credential = vault_issue(grant_id, *args, **kwargs)
    print(json.dumps({"grant_id": grant_id, "secret": credential.secret}), flush=True)
    sys.stdin.readline()
    return credential

backend.issue = issue_slowly
alice = Principal("https://idp", "alice", groups=("engineers",), email="alice@example.com")
if len(sys.argv) > 2:  # extend this grant instead
    grant, _ = grants.extend(alice, sys.argv[2], "5m")
else:
    grant, _ = grants.request(alice, "kv-read", "1h", "slow but alive")
print(json.dumps({"status": grant.status}), flush=True)
"""


def test_a_starting_broker_leaves_a_live_processs_issuance_in_flight_alone(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret
    )
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_BROKER, str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = json.loads(slow.stdout.readline() or "null")
        assert said, slow.stderr.read() if slow.poll() is not None else "no answer"

        starting = make_app(reaper={"enabled": True})  # a second broker on the same store
        jit = starting.extensions["jit"]
        try:
            first_pass(jit.reaper)
        finally:
            jit.reaper.stop()
        assert jit.grants.reconcile() == []  # and once more, by hand: nothing to settle
        assert jit.grants.store.get_grant(said["grant_id"]).status == "issuing"
        assert token_works(openbao, said["secret"])

        out, err = slow.communicate("go\n", timeout=30)  # the slow request finishes
        assert slow.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"status": "active"}
    finally:
        if slow.poll() is None:
            slow.kill()
    grants = jit.grants
    assert grants.store.get_grant(said["grant_id"]).status == "active"
    assert types(grants, said["grant_id"]) == ["request", "decision", "issue"]
    assert token_works(openbao, said["secret"])
    grants.release(ALICE, said["grant_id"])
    grants.reap_due()
    assert grants.store.get_grant(said["grant_id"]).status == "revoked"
    assert not token_works(openbao, said["secret"])


def test_brokers_settling_a_dead_process_at_the_same_moment_settle_each_grant_once(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret
    )
    said = crash_with_issuances_in_flight(config, answered=3, waiting=1)
    grants = make_app().extensions["jit"].grants
    assert reconcile_at_once(grants) == []
    for each in said:
        assert grants.store.get_grant(each["grant_id"]).status == "issue_failed"
        assert types(grants, each["grant_id"]).count("issue_failed") == 1
        if each["secret"]:
            assert not token_works(openbao, each["secret"])
            findings = [e for e in grants.chain(each["grant_id"]) if e["type"] == "reconcile"]
            assert findings and all(e["data"]["gone"] for e in findings)
    assert audit.verify(grants.store.audit_entries()).ok
    assert grants.reconcile() == []


def first_pass(reaper, timeout=15):
    """Wait for a started reaper's first completed pass and its first reconciliation."""
    deadline = time.monotonic() + timeout
    while reaper.last_run is None or reaper.last_reconcile is None:
        assert time.monotonic() < deadline, "the reaper never completed a pass"
        time.sleep(0.1)


def reconcile_at_once(grants, sweeps=8) -> list[Exception]:
    """As many reconciliations of one store as `sweeps`, started at the same moment (brokers
    starting together); what any of them raised."""
    start = threading.Barrier(sweeps)
    failures = []

    def settle():
        start.wait()
        try:
            grants.reconcile()
        except Exception as exc:  # noqa: BLE001 (reported to the caller)
            failures.append(exc)

    threads = [threading.Thread(target=settle) for _ in range(sweeps)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return failures


def extension_killed_after_vault(make_app, config, openbao):
    """An extendable grant, issued here; a broker subprocess extending it is SIGKILLed the
    moment Vault has answered. Returns the grant, its recorded credential, and the unrecorded
    token (its secret and accessor)."""
    grants = make_app(policy_text=APPROVAL_POLICY).extensions["jit"].grants
    grant, first = grants.request(ALICE, "stretchy", "10m", "crash while extending")
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_BROKER, str(config), grant.id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == -9, crashed.stderr
    said = json.loads(crashed.stdout.splitlines()[0])
    assert said["grant_id"] == grant.id and "still alive" not in crashed.stdout
    assert token_works(openbao, said["secret"])  # Vault issued it; nobody recorded it
    said["accessor"] = openbao.client().auth.token.lookup(said["secret"])["data"]["accessor"]
    (claim,) = [held for held in grants.store.credentials_of(grant.id) if not held.handle]
    assert claim.issuing_process and not claim.gone_at  # the dead process's claim, still open
    assert grants.store.get_grant(grant.id).handle == first.handle
    return grant, first, said


def test_an_extension_in_flight_when_a_broker_is_killed_is_settled_as_soon_as_one_starts(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, APPROVAL_POLICY
    )
    grant, first, stray = extension_killed_after_vault(make_app, config, openbao)

    restarted = make_app(policy_text=APPROVAL_POLICY, reaper={"enabled": True})
    jit = restarted.extensions["jit"]
    grants = jit.grants
    try:
        first_pass(jit.reaper)  # no grace period for a process that is dead
        assert not token_works(openbao, stray["secret"])
        assert token_works(openbao, first.secret)  # the grant's own credential is untouched
        (found,) = [e["data"] for e in grants.chain(grant.id) if e["type"] == "reconcile"]
        assert found["handle"] == grants._fingerprint(stray["accessor"])
        assert found["gone"] and found["grant_status"] == "active" and "died" in found["why"]
        # The claim now lists what its Vault call made, verified gone: it blocks nothing.
        listed = grants.store.credentials_of(grant.id)
        assert [(held.handle, bool(held.gone_at)) for held in listed] == [
            (first.handle, False),
            (stray["accessor"], True),
        ]

        _, second = grants.extend(ALICE, grant.id, "5m")  # not a 409
        assert token_works(openbao, second.secret) and not token_works(openbao, first.secret)
        grants.release(ALICE, grant.id)
        wait_for_status(grants, grant.id, "revoked", timeout=15)
    finally:
        jit.stop()
    assert not token_works(openbao, second.secret)
    assert live_tokens_of(openbao, grant.id) == set()
    assert audit.verify(grants.store.audit_entries()).ok


def test_a_dead_processs_extension_claim_does_not_block_the_next_extension(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, APPROVAL_POLICY
    )
    grant, first, stray = extension_killed_after_vault(make_app, config, openbao)
    grants = make_app(policy_text=APPROVAL_POLICY).extensions["jit"].grants  # no reconcile yet

    _, second = grants.extend(ALICE, grant.id, "5m")  # not a 409, though the claim is seconds old
    assert token_works(openbao, second.secret) and not token_works(openbao, first.secret)
    assert token_works(openbao, stray["secret"])  # what the dead process got is still there...
    (found,) = grants.reconcile()  # ...until a sweep: the only open claim left is the dead one's
    assert found["handle"] == grants._fingerprint(stray["accessor"]) and found["gone"]
    assert not token_works(openbao, stray["secret"])
    assert token_works(openbao, second.secret)
    grants.release(ALICE, grant.id)
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()
    assert audit.verify(grants.store.audit_entries()).ok


def test_brokers_settling_a_dead_processs_extension_at_the_same_moment_settle_it_once(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, APPROVAL_POLICY
    )
    grant, first, stray = extension_killed_after_vault(make_app, config, openbao)
    grants = make_app(policy_text=APPROVAL_POLICY).extensions["jit"].grants
    # Every sweep judges the token a stray before any of them takes the dead claim: the worst
    # interleaving, every time, not only when the machine happens to produce it.
    sweeps, adopt = 8, grants._adopt
    all_judged = threading.Barrier(sweeps, timeout=30)

    def adopt_when_all_judged(*args):
        all_judged.wait()
        return adopt(*args)

    grants._adopt = adopt_when_all_judged

    assert reconcile_at_once(grants, sweeps) == []

    assert not token_works(openbao, stray["secret"])
    assert token_works(openbao, first.secret)
    (found,) = [e["data"] for e in grants.chain(grant.id) if e["type"] == "reconcile"]
    assert found["gone"] and found["handle"] == grants._fingerprint(stray["accessor"])
    (adopted,) = [held for held in grants.store.credentials_of(grant.id) if held.gone_at]
    assert adopted.handle == stray["accessor"]
    assert grants.store.get_grant(grant.id).status == "active"
    assert audit.verify(grants.store.audit_entries()).ok
    assert grants.reconcile() == []
    grants.release(ALICE, grant.id)
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()


def test_a_starting_broker_leaves_a_live_processs_extension_in_flight_alone(
    tmp_path, make_app, openbao, oidc_provider, broker_port, oidc_client_secret
):
    config = crash_config(
        make_app, tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, APPROVAL_POLICY
    )
    grants = make_app(policy_text=APPROVAL_POLICY).extensions["jit"].grants
    grant, first = grants.request(ALICE, "stretchy", "10m", "slow extension")
    slow = subprocess.Popen(
        [sys.executable, "-c", SLOW_BROKER, str(config), grant.id],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        said = json.loads(slow.stdout.readline() or "null")
        assert said, slow.stderr.read() if slow.poll() is not None else "no answer"

        starting = make_app(policy_text=APPROVAL_POLICY, reaper={"enabled": True})
        jit = starting.extensions["jit"]
        try:
            first_pass(jit.reaper)
            with pytest.raises(GrantConflict):  # the live process's claim still holds
                jit.grants.extend(ALICE, grant.id, "5m")
        finally:
            jit.reaper.stop()
        grants = jit.grants
        assert grants.reconcile() == []  # and once more, by hand: nothing to settle
        assert token_works(openbao, said["secret"]) and token_works(openbao, first.secret)
        (claim,) = [held for held in grants.store.credentials_of(grant.id) if not held.handle]
        assert not claim.gone_at

        out, err = slow.communicate("go\n", timeout=30)  # the slow extension finishes
        assert slow.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"status": "active"}
    finally:
        if slow.poll() is None:
            slow.kill()
    assert types(grants, grant.id).count("extend") == 1
    assert "reconcile" not in types(grants, grant.id)
    assert token_works(openbao, said["secret"]) and not token_works(openbao, first.secret)
    grants.release(ALICE, grant.id)
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()
    assert audit.verify(grants.store.audit_entries()).ok
