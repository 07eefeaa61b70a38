"""`jit serve` under gunicorn, as a process, against real OpenBao and the real provider: two
worker processes, each with exactly one reaper, notifier and forwarder; grants issued through
either; metrics from both workers on one scrape; JSON log lines with request ids and no secrets;
SIGTERM ends it cleanly (every worker stops its threads, nothing is left claimed, the last
checkpoint covers the whole log)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from broker import audit
from scripts.launchers import ROOT, BrokerProcess, free_port
from tests.helpers import TEST_POLICY, storage_section, store_at, token_works, wait_until

JIT = str(Path(sys.executable).parent / "jit")
ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-14 gunicorn"}


@pytest.fixture
def served(tmp_path, openbao, oidc_provider, oidc_client_secret, vault_setup):
    (tmp_path / "policy.toml").write_text(TEST_POLICY)
    broker = BrokerProcess.start(
        tmp_path,
        free_port(),
        openbao,
        openbao.broker_token,
        oidc_provider,
        oidc_client_secret,
        tmp_path / "policy.toml",
        JIT_SERVER_WORKERS="2",
        JIT_SERVER_THREADS="4",
        JIT_SERVER_GRACEFUL_TIMEOUT="10",
        JIT_SERVER_LOG_FORMAT="json",
        **{f"JIT_STORAGE_{k.upper()}": v for k, v in storage_section(tmp_path).items()},
    )
    try:
        yield broker.process.popen, broker.url, broker.env, tmp_path
    finally:
        broker.stop(5)


def test_two_workers_each_run_one_of_each_thread_and_stop_cleanly_on_sigterm(served, tokens):
    process, url, env, workdir = served
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 20
    while len(seen) < 2 and time.monotonic() < deadline:
        with requests.Session() as fresh:  # a new connection: any worker may take it
            answer = fresh.get(f"{url}/healthz", timeout=5).json()
        seen[answer["process"]] = answer["threads"]
    assert len(seen) == 2, f"only one worker answered: {seen}"
    assert all(threads["jit-reaper"] == 1 for threads in seen.values())
    assert process.pid not in seen  # the workers, not the master, serve

    headers = {"Authorization": f"Bearer {tokens('alice')}"}
    granted = [
        requests.post(f"{url}/api/v1/requests", json=ASK, headers=headers, timeout=15)
        for _ in range(4)
    ]
    assert [answer.status_code for answer in granted] == [201] * 4
    ids = [answer.json()["id"] for answer in granted]
    for grant_id in ids:
        release = requests.post(
            f"{url}/api/v1/requests/{grant_id}/release", headers=headers, timeout=15
        )
        assert release.status_code == 200

    def revoked(grant_id: str) -> bool:
        answer = requests.get(f"{url}/api/v1/requests/{grant_id}", headers=headers, timeout=5)
        return answer.json()["status"] == "revoked"

    assert wait_until(lambda: all(revoked(grant_id) for grant_id in ids), timeout=20)

    def issued_total() -> float:
        text = requests.get(f"{url}/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "jit_issuances_total"
        )

    # Whichever worker answers, the scrape counts what both issued.
    assert {issued_total() for _ in range(6)} == {4.0}
    # What gunicorn refuses itself is a 4xx, never a 5xx.
    huge = requests.get(f"{url}/api/v1/requests", headers={"X-Pad": "x" * 70_000}, timeout=5)
    assert huge.status_code == 431
    many = {f"X-{n}": "y" for n in range(120)}
    assert 400 <= requests.get(f"{url}/api/v1/requests", headers=many, timeout=5).status_code < 500
    traced = requests.get(
        f"{url}/api/v1/requests?code=the-authorization-code",
        headers={**headers, "X-Request-Id": "trace-0123456789"},
        timeout=5,
    )
    assert traced.headers["X-Request-Id"] == "trace-0123456789"

    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    verify = subprocess.run(
        [JIT, "audit", "verify"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    store = store_at(workdir / "broker.db")
    head = store.audit_head()["seq"]
    assert f"signed through seq {head}" in verify.stdout  # the last checkpoint covers all
    claimed = store.grants_in(("issuing", "revoking"))
    assert claimed == []  # nothing left claimed by the stopped workers

    text = (workdir / "serve.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line JSON
    assert any("Booting worker" in line["message"] for line in lines)  # gunicorn's own, too
    access = [line for line in lines if line["logger"] == "broker.access"]
    assert any(
        line["request_id"] == "trace-0123456789" and line["message"].startswith("GET /api/v1/")
        for line in access
    )
    assert "the-authorization-code" not in text and tokens("alice") not in text


def test_windows_closing_together_under_two_workers_are_removed_once_each(served, tokens, openbao):
    """One SQLite file, two worker processes, each with its reaper: 40 windows of 4 seconds
    issued through both close together; each grant is revoked and verified exactly once, every
    token is dead, and the chain is one chain (no fork)."""
    process, url, env, workdir = served
    headers = {"Authorization": f"Bearer {tokens('alice')}"}
    short = {**ASK, "duration": "4s"}

    def issue(_: int) -> dict:
        with requests.Session() as fresh:  # new connections: both workers take some
            answer = fresh.post(f"{url}/api/v1/requests", json=short, headers=headers, timeout=30)
        assert answer.status_code == 201, answer.text
        return answer.json()

    with ThreadPoolExecutor(8) as pool:
        granted = list(pool.map(issue, range(40)))
    store = store_at(workdir / "broker.db")
    assert wait_until(
        lambda: all(store.get_grant(g["id"]).status == "revoked" for g in granted), timeout=30
    )
    for grant in granted:
        chain = [entry["type"] for entry in store.audit_entries(grant_id=grant["id"])]
        assert chain.count("revoke") == 1 and chain.count("verify") == 1, chain
        assert not token_works(openbao, grant["credential"]["token"])
    assert audit.verify(store.audit_entries()).ok


def test_more_kept_alive_clients_than_threads_are_all_answered(served, tokens):
    """24 keep-alive clients against 2 workers x 4 threads, each issuing and releasing over its
    own connection: all answered, none starved by connections kept open."""
    _, url, _, _ = served
    bearer = {"Authorization": f"Bearer {tokens('alice')}"}

    def client(n: int) -> list[int]:
        statuses = []
        with requests.Session() as session:
            for _ in range(3):
                made = session.post(f"{url}/api/v1/requests", json=ASK, headers=bearer, timeout=60)
                statuses.append(made.status_code)
                if made.status_code == 201:
                    gone = session.post(
                        f"{url}/api/v1/requests/{made.json()['id']}/release?wait=verified",
                        headers=bearer,
                        timeout=60,
                    )
                    statuses.append(200 if gone.json().get("status") == "revoked" else -1)
        return statuses

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(client, range(24)))
    assert answers == [[201, 200] * 3] * 24
