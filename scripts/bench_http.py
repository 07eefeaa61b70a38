"""`scripts/bench --http`: the broker over HTTP under `jit serve` (gunicorn), side by side in one
run with the raw OpenBao calls over HTTP a team would script instead, from keep-alive clients:
issue (POST /api/v1/requests -> a token) against a bare token create, at 1 and N concurrent
clients (p50, p99, throughput, the worker's CPU per grant), release -> verified revoked
(?wait=verified) against a bare revoke and lookup,
and the broker worker's memory with the grants still live (`--scale`: windows closing by the
thousand, scripts/bench_scale.py). Starts its own OpenBao, OIDC
provider and broker; prints ratios and flags any run with errors. A measurement, not a test."""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.backends.vault import TOKEN_ROLE  # noqa: E402
from scripts.launchers import (  # noqa: E402
    BrokerProcess,
    OidcProvider,
    OpenBao,
    Postgres,
    configure_transit_engine,
    free_port,
    provider_config,
    user_access_token,
)

VAULT_POLICY = "jit-bench-read"
POLICY = f"""
[entitlements.bench]
vault_policies = ["{VAULT_POLICY}"]
max_duration = "1h"
[entitlements.bench.requesters]
groups = ["engineers"]
"""
ASK = {"entitlement": "bench", "duration": "10m", "reason": "benchmark"}


@dataclass
class Run:
    """Latencies (seconds) of the calls that succeeded, how many failed, and the wall time."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    results: list = field(default_factory=list)

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def concurrently(clients: int, total: int, make: Callable[[], Callable[[], object]]) -> Run:
    """`total` calls shared by `clients` threads, each with its own keep-alive client (`make`)."""
    run, lock = Run(), threading.Lock()
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def worker(count: int) -> None:
        call = make()
        barrier.wait()
        for _ in range(count):
            started = time.perf_counter()
            try:
                result = call()
            except Exception:  # noqa: BLE001 - counted and flagged, never hidden
                with lock:
                    run.errors += 1
                continue
            took = time.perf_counter() - started
            with lock:
                run.latencies.append(took)
                run.results.append(result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in share]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - began
    return run


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User and system CPU the process has used so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_cpu_seconds(master: int) -> float:
    """The CPU used so far by every worker process of the gunicorn `master` (its children)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sum(cpu_seconds(int(child)) for child in children)


@dataclass
class Stack:
    """OpenBao, the OIDC provider and `jit serve`, started for one bench run: the broker's own
    OpenBao token, alice's bearer header for its API, and where it all lives."""

    bao: OpenBao
    broker: BrokerProcess
    broker_token: str
    bearer: dict[str, str]
    workdir: Path

    @property
    def url(self) -> str:
        return self.broker.url

    def raw_issuer(self, tag: str = "bench") -> Callable[[], object]:
        """A bare token create with the broker's token and role, as a team would script it."""
        client = self.bao.client(self.broker_token)
        return lambda: client.auth.token.create(
            role_name=TOKEN_ROLE,
            policies=[VAULT_POLICY],
            ttl="600s",
            explicit_max_ttl="600s",
            renewable=False,
            meta={"jit_grant_id": tag},
        )["auth"]["accessor"]


def revoke_and_look(client: hvac.Client, accessor: str) -> None:
    """The raw removal a team would script: revoke by accessor, then look it up to see it gone."""
    client.auth.token.revoke_accessor(accessor)
    try:
        client.auth.token.lookup_accessor(accessor)
    except Exception:  # noqa: BLE001 - gone is the expected answer
        return
    raise RuntimeError("the token survived its revocation")


@contextmanager
def served(prefix: str, **settings: str) -> Iterator[Stack]:
    """Start the stack (`settings`: more JIT_* values for `jit serve`); stop it all after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    bao = OpenBao.start(workdir=workdir / "openbao")
    provider = broker = None
    try:
        root = bao.client()
        root.sys.create_or_update_policy(
            VAULT_POLICY, 'path "secret/data/bench/*" { capabilities = ["read"] }'
        )
        configure_transit_engine(root)
        broker_token = bao.make_broker_token([VAULT_POLICY])
        secret = secrets.token_urlsafe(24)
        port = free_port()
        provider = OidcProvider.start(
            provider_config(free_port(), f"http://127.0.0.1:{port}/auth/callback", secret),
            workdir / "oidc",
        )
        bearer = {"Authorization": f"Bearer {user_access_token(provider, 'alice')}"}
        (workdir / "policy.toml").write_text(POLICY)
        broker = BrokerProcess.start(
            workdir / "broker",
            port,
            bao,
            broker_token,
            provider,
            secret,
            workdir / "policy.toml",
            **settings,
        )
        yield Stack(bao, broker, broker_token, bearer, workdir)
    finally:
        if broker is not None:
            broker.stop()
        if provider is not None:
            provider.stop()
        bao.stop()


def _ratio(ours: float, raw: float) -> float:
    return ours / raw if raw else 0.0


def main(argv: list[str]) -> None:
    if "--scale" in argv:  # reaping at scale: a run of its own
        from scripts import bench_scale

        bench_scale.main(argv)
        return
    parser = argparse.ArgumentParser(prog="scripts/bench --http")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--count", type=int, default=400, help="issues per measurement")
    parser.add_argument("--clients", type=int, default=32, help="the concurrent run's clients")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=32, help="threads per worker")
    parser.add_argument("--postgres", action="store_true", help="the broker on PostgreSQL")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each figure their median")
    args = parser.parse_args(argv)

    settings = {"JIT_SERVER_WORKERS": str(args.workers), "JIT_SERVER_THREADS": str(args.threads)}
    postgres = Postgres.start() if args.postgres else None
    if postgres is not None:
        settings["JIT_STORAGE_URL"] = postgres.dsn
    try:
        with served("jit-bench-http-", **settings) as stack:
            measure(args, stack)
    finally:
        if postgres is not None:
            postgres.stop()


def measure(args: argparse.Namespace, stack: Stack) -> None:
    """The issue and release runs of one bench, against the started stack, and their report."""
    bearer, url = stack.bearer, stack.url

    def raw_client() -> Callable[[], object]:
        return stack.raw_issuer()  # hvac keeps one keep-alive session per client

    def broker_client() -> Callable[[], object]:
        session = requests.Session()

        def issue() -> str:
            answer = session.post(f"{url}/api/v1/requests", json=ASK, headers=bearer, timeout=60)
            if answer.status_code != 201:
                raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
            return str(answer.json()["id"])

        return issue

    # Warm both sides (connections, the broker's caches), then measure, raw and broker
    # alternating, round after round: a drift of the machine's speed falls on both alike.
    concurrently(1, 20, raw_client)
    live: list[str] = list(concurrently(1, 20, broker_client).results)
    worker = requests.get(f"{url}/healthz", timeout=5).json()["process"]
    master = stack.broker.process.popen.pid
    rounds: dict[str, list[tuple[Run, Run]]] = {}
    cpu: dict[int, list[float]] = {}
    for _ in range(args.rounds):
        for clients in sorted({1, args.clients}):
            raw = concurrently(clients, args.count, raw_client)
            before = workers_cpu_seconds(master)
            ours = concurrently(clients, args.count, broker_client)
            spent = workers_cpu_seconds(master) - before
            cpu.setdefault(clients, []).append(spent / max(len(ours.latencies), 1))
            live += ours.results
            rounds.setdefault(f"issue, {clients} client(s)", []).append((raw, ours))
        memory = rss_mib(worker)
        to_release, live = live[:100], live[100:]
        pair = release_round(stack, to_release, raw_client)
        rounds.setdefault("release -> verified revoked", []).append(pair)
    report(args, stack, rounds, cpu, memory, len(live))


def release_round(
    stack: Stack, grant_ids: list[str], raw_client: Callable[[], Callable[[], object]]
) -> tuple[Run, Run]:
    """Release -> verified revoked, one at a time (the reaper is woken by each release), against
    a bare revoke and lookup of as many tokens, made just before."""
    url, bearer = stack.url, stack.bearer
    session = requests.Session()
    to_release = iter(grant_ids)

    def release_verified() -> None:
        """?wait=verified: the answer comes once the token is verified gone; should the
        reaper's claim have won, the bench polls as a client would."""
        grant_id = next(to_release)
        answer = session.post(
            f"{url}/api/v1/requests/{grant_id}/release?wait=verified",
            headers=bearer,
            timeout=30,
        )
        if answer.status_code != 200:
            raise RuntimeError(f"release: HTTP {answer.status_code}")
        status = answer.json()["status"]
        while status != "revoked":
            if status == "revoke_failed":
                raise RuntimeError("the removal was not verified")
            time.sleep(0.001)
            status = session.get(
                f"{url}/api/v1/requests/{grant_id}", headers=bearer, timeout=30
            ).json()["status"]

    accessors = iter(concurrently(1, len(grant_ids), raw_client).results)
    raw_client_remove = stack.bao.client(stack.broker_token)

    def raw_remove() -> None:
        revoke_and_look(raw_client_remove, next(accessors))

    removal_raw = concurrently(1, len(grant_ids), lambda: raw_remove)
    return removal_raw, concurrently(1, len(grant_ids), lambda: release_verified)


def report(
    args: argparse.Namespace,
    stack: Stack,
    rounds: dict[str, list[tuple[Run, Run]]],
    cpu: dict[int, list[float]],
    memory: float,
    live: int,
) -> None:
    """Each figure the median of its rounds' (a ratio: the median of each round's ratio)."""
    print(
        f"jit-broker bench --http: jit serve (gunicorn, {args.workers} worker(s) x "
        f"{args.threads} threads, {'PostgreSQL' if args.postgres else 'SQLite WAL'}) and "
        f"OpenBao {stack.bao.addr}, {args.rounds} round(s), medians\n"
    )
    print(
        f"{'':30}{'raw p50/p99 ms':>18}{'broker p50/p99 ms':>20}{'ratio p50/p99':>16}"
        f"{'raw/s':>9}{'broker/s':>10}{'ratio':>7}"
    )
    flagged = False
    for name, pairs in rounds.items():
        errors = sum(raw.errors for raw, _ in pairs), sum(ours.errors for _, ours in pairs)
        flagged = flagged or any(errors)

        def med(figure: Callable[[Run, Run], float], runs: list[tuple[Run, Run]] = pairs) -> float:
            return statistics.median(figure(raw, ours) for raw, ours in runs)

        print(
            f"{name:30}{med(lambda r, o: r.p(0.5)) * 1e3:>8.2f} /"
            f"{med(lambda r, o: r.p(0.99)) * 1e3:>7.2f}"
            f"{med(lambda r, o: o.p(0.5)) * 1e3:>10.2f} /{med(lambda r, o: o.p(0.99)) * 1e3:>7.2f}"
            f"{med(lambda r, o: o.p(0.5) / r.p(0.5)):>8.2f}x/"
            f"{med(lambda r, o: o.p(0.99) / r.p(0.99)):>5.2f}x"
            f"{med(lambda r, o: r.rate):>9.0f}{med(lambda r, o: o.rate):>10.0f}"
            f"{med(lambda r, o: _ratio(o.rate, r.rate)):>6.2f}x"
            + (f"  ERRORS raw {errors[0]} broker {errors[1]}" if any(errors) else "")
        )
    print(
        "\nbroker workers' CPU per grant issued (all workers): "
        + ", ".join(
            f"{statistics.median(ms) * 1e3:.2f} ms at {n} client(s)" for n, ms in cpu.items()
        )
    )
    print(f"broker worker RSS with {live} grants live: {memory:.0f} MiB")
    if flagged:
        print("\nTHIS RUN HAD ERRORS: its figures are not comparable.")


if __name__ == "__main__":
    main(sys.argv[1:])
