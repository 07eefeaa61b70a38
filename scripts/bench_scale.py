"""`scripts/bench --http --scale`: reaping at scale through a running `jit serve`. Windows are
issued over HTTP (parallel keep-alive clients) with durations chosen so that they end together:
200 spread over a minute, 1,000 in one second, 10,000 in one second. The bench polls the store
for each grant's first `revoked` and reports the lag from its window end (p50/p99/max) and the
burst's rate, beside the raw *sequential* revoke rate of the same run (revoke-accessor + lookup,
one at a time, on tokens made for it), and the broker worker's RSS idle, with the grants live and
after they are all revoked. With `--postgres --replicas N`, N `jit serve` processes share the
store (each serving and reaping; the clients issue to them in turn). Prints ratios and targets;
flags errors. A measurement, not a test."""

from __future__ import annotations

import argparse
import math
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_http import (  # noqa: E402
    Run,
    Stack,
    concurrently,
    revoke_and_look,
    rss_mib,
    served,
)
from scripts.launchers import (  # noqa: E402
    BrokerProcess,
    Postgres,
    free_port,
    jit_serving,
)

# What replicas on one store must share besides it: the session key and the audit HMAC key.
SHARED_KEYS = ("session.key", "audit-hmac.key")


class Revocations:
    """Reads the broker's store (read-only, from this process) for grants now `revoked`, and
    remembers when each was first seen so; also counts `revoke_failed` audit entries."""

    def __init__(self, sqlite_path: Path | None, dsn: str | None) -> None:
        self.sqlite_path, self.dsn = sqlite_path, dsn
        self.seen: dict[str, float] = {}

    def _query(self, sql: str) -> list[tuple]:
        if self.dsn:
            import psycopg

            with psycopg.connect(self.dsn) as conn:
                return list(conn.execute(sql).fetchall())
        uri = f"file:{self.sqlite_path}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            return list(conn.execute(sql).fetchall())

    def poll(self, ids: set[str]) -> int:
        """Note the grants of `ids` newly `revoked`; how many of `ids` are revoked now."""
        now = time.time()
        for (grant_id,) in self._query("SELECT id FROM grants WHERE status = 'revoked'"):
            if grant_id in ids and grant_id not in self.seen:
                self.seen[grant_id] = now
        return sum(1 for i in ids if i in self.seen)

    def failures(self) -> int:
        rows = self._query("SELECT COUNT(*) FROM audit WHERE type = 'revoke_failed'")
        return int(rows[0][0])

    def statuses(self, ids: set[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for grant_id, status in self._query("SELECT id, status FROM grants"):
            if grant_id in ids:
                counts[status] = counts.get(status, 0) + 1
        return counts


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Scenario:
    """One set of windows: issued, then watched until every one is revoked (or a deadline)."""

    def __init__(self, name: str, count: int, spread: float, target_p99: float | None) -> None:
        self.name, self.count, self.spread, self.target_p99 = name, count, spread, target_p99
        self.issue = Run()
        self.ends: dict[str, float] = {}
        self.lags: list[float] = []
        self.rate = 0.0
        self.unrevoked = 0
        self.failures = 0
        self.late_issues = 0
        self.rss_live = self.rss_after = float("nan")


def run_scenario(
    scenario: Scenario,
    urls: list[str],
    bearer: dict[str, str],
    clients: int,
    issue_rate: float,
    watch: Revocations,
    worker: int,
) -> None:
    """Issue `count` grants whose windows end at `first_end` + i * spread / count (whole
    seconds, so ends fall within one second when spread is 0), then poll until all are revoked."""
    issuing = scenario.count / max(issue_rate, 1.0)
    first_end = math.ceil(time.time() + issuing * 1.5 + 10)
    sequence = iter(range(scenario.count))
    lock = threading.Lock()
    shown: list[Exception] = []
    failures_before = watch.failures()
    turn = iter(range(clients))

    def client() -> Callable[[], object]:
        session = requests.Session()
        with lock:  # each client issues to one replica, the replicas in turn
            url = urls[next(turn) % len(urls)]

        def issue() -> tuple[str, str, float]:
            with lock:
                i = next(sequence)
            end = first_end + i * scenario.spread / scenario.count
            duration = max(1, math.ceil(end - time.time()))
            answer = session.post(
                f"{url}/api/v1/requests",
                json={"entitlement": "bench", "duration": duration, "reason": "scale"},
                headers=bearer,
                timeout=120,
            )
            try:
                if answer.status_code != 201:
                    raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:200]}")
                body = answer.json()
                return str(body["id"]), str(body["window"]["end"]), time.time()
            except Exception as exc:
                if not shown:
                    shown.append(exc)
                    print(f"  first issue error: {exc!r}", flush=True)
                raise

        return issue

    scenario.issue = concurrently(clients, scenario.count, client)
    for grant_id, window_end, issued_at in scenario.issue.results:
        scenario.ends[grant_id] = _at(window_end)
        if issued_at > _at(window_end) - 1:
            scenario.late_issues += 1  # its window was nearly over before the burst began
    scenario.rss_live = rss_mib(worker)
    ids = set(scenario.ends)
    last_end = max(scenario.ends.values(), default=time.time())
    deadline = last_end + 600
    while time.time() < deadline:
        if watch.poll(ids) == len(ids):
            break
        time.sleep(0.05)
    scenario.lags = [watch.seen[i] - scenario.ends[i] for i in ids if i in watch.seen]
    scenario.unrevoked = len(ids) - len(scenario.lags)
    if scenario.lags:
        first = min(scenario.ends.values())
        finished = max(watch.seen[i] for i in ids if i in watch.seen)
        scenario.rate = len(scenario.lags) / max(finished - first, 1e-3)
    scenario.failures = watch.failures() - failures_before
    if scenario.unrevoked:
        print(f"  {scenario.name}: not revoked: {watch.statuses(ids - set(watch.seen))}")
    time.sleep(5)  # let the reaper's pool and the store settle before reading memory
    scenario.rss_after = rss_mib(worker)


def raw_sequential(stack: Stack, count: int, clients: int) -> Run:
    """Tokens made in parallel, then revoked and looked up one at a time: the raw rate."""
    accessors = iter(concurrently(clients, count, lambda: stack.raw_issuer("bench-raw")).results)
    client = stack.bao.client(stack.broker_token)

    def remove() -> None:
        revoke_and_look(client, next(accessors))

    return concurrently(1, count, lambda: remove)


def start_replica(stack: Stack, number: int) -> BrokerProcess:
    """Another `jit serve` on the stack's store, configured as the first (its own port, log and
    data directory, holding copies of the keys replicas must share)."""
    first = Path(stack.broker.env["JIT_SERVER_DATA_DIR"])
    workdir = stack.workdir / f"replica-{number}"
    workdir.mkdir()
    for name in SHARED_KEYS:
        if (first / name).exists():
            shutil.copy2(first / name, workdir / name)
    port = free_port()
    env = dict(
        stack.broker.env,
        JIT_SERVER_PORT=str(port),
        JIT_SERVER_BASE_URL=f"http://127.0.0.1:{port}",
        JIT_SERVER_DATA_DIR=str(workdir),
    )
    url = f"http://127.0.0.1:{port}"
    process = jit_serving(url, env, workdir / "serve.log", name=f"jit serve {number}")
    return BrokerProcess(process, url, env)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench --http --scale")
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--count", type=int, default=10_000, help="the big burst's windows")
    parser.add_argument("--clients", type=int, default=16, help="issuing clients")
    parser.add_argument("--raw", type=int, default=1000, help="tokens in the raw sequential run")
    parser.add_argument("--threads", type=int, default=32, help="gunicorn threads (1 worker)")
    parser.add_argument("--removal-workers", type=int, default=0, help="[reaper] (0: default)")
    parser.add_argument("--postgres", action="store_true", help="the broker on PostgreSQL")
    parser.add_argument("--only", default="", help="spread,1000,burst (default: all)")
    parser.add_argument("--replicas", type=int, default=1, help="jit serve processes (--postgres)")
    args = parser.parse_args(argv)
    if args.replicas > 1 and not args.postgres:
        parser.error("--replicas needs --postgres (a SQLite file serves one broker process)")

    settings = {"JIT_SERVER_WORKERS": "1", "JIT_SERVER_THREADS": str(args.threads)}
    if args.removal_workers:
        settings["JIT_REAPER_REMOVAL_WORKERS"] = str(args.removal_workers)
    postgres = Postgres.start() if args.postgres else None
    dsn = postgres.dsn if postgres is not None else None
    if dsn:
        settings["JIT_STORAGE_URL"] = dsn
    try:
        with served("jit-bench-scale-", **settings) as stack:
            replicas = []
            try:
                replicas = [start_replica(stack, n) for n in range(2, args.replicas + 1)]
                measure(args, stack, dsn, [r.url for r in replicas])
            finally:
                for replica in replicas:
                    replica.stop()
    finally:
        if postgres is not None:
            postgres.stop()


def measure(args: argparse.Namespace, stack: Stack, dsn: str | None, others: list[str]) -> None:
    """The scenarios of one run, against the started stack (and the `others` replicas' URLs),
    and their report. RSS is the first replica's worker."""
    bao, bearer, url, workdir = stack.bao, stack.bearer, stack.url, stack.workdir
    urls = [url, *others]
    worker = requests.get(f"{url}/healthz", timeout=5).json()["process"]
    watch = Revocations(None if dsn else workdir / "broker" / "broker.db", dsn)

    # Warm the broker (connections, caches) and measure its issue rate for the timing.
    warm = Scenario("warm-up", 200, 0, None)
    run_scenario(warm, urls, bearer, args.clients, 50, watch, worker)
    issue_rate = warm.issue.rate or 50
    idle = rss_mib(worker)

    raw = raw_sequential(stack, args.raw, args.clients)
    raw_rate = raw.rate

    wanted = set(args.only.split(",")) if args.only else {"spread", "1000", "burst"}
    scenarios = [
        s
        for key, s in (
            ("spread", Scenario("200 over a minute", 200, 60, 1.0)),
            ("1000", Scenario("1,000 in one second", 1000, 0, 2.0)),
            ("burst", Scenario(f"{args.count:,} in one second", args.count, 0, None)),
        )
        if key in wanted
    ]
    for scenario in scenarios:
        print(f"... {scenario.name}", flush=True)
        run_scenario(scenario, urls, bearer, args.clients, issue_rate, watch, worker)
        issue_rate = scenario.issue.rate or issue_rate

    store = "PostgreSQL" if dsn else "SQLite WAL"
    print(
        f"\njit-broker bench --http --scale: {len(urls)} x jit serve (gunicorn, 1 worker x "
        f"{args.threads} threads, {store}, removal_workers "
        f"{args.removal_workers or 'default'}) and OpenBao {bao.addr}, one run\n"
    )
    print(
        f"raw sequential revoke + lookup: {raw_rate:.0f}/s "
        f"(p50 {raw.p(0.5) * 1e3:.2f} ms, {len(raw.latencies)} tokens)"
        + (f"  ERRORS {raw.errors}" if raw.errors else "")
    )
    print(f"broker worker RSS idle (after the warm-up's 200 grants): {idle:.0f} MiB\n")
    print(
        f"{'':24}{'issued/s':>9}{'lag p50':>9}{'p99':>8}{'max':>8}{'revoked/s':>11}"
        f"{'vs raw':>8}{'RSS live':>10}{'after':>7}  verdict"
    )
    flagged = bool(raw.errors)
    for s in scenarios:
        errors = s.issue.errors + s.unrevoked + s.failures + s.late_issues
        flagged = flagged or bool(errors)
        if s.target_p99 is not None:
            ok = _p(s.lags, 0.99) <= s.target_p99
            verdict = f"p99 <= {s.target_p99:.0f} s: {'met' if ok else 'NOT met'}"
        else:
            ok = s.rate >= 2 * raw_rate
            verdict = f">= 2x raw: {'met' if ok else 'NOT met'}"
            verdict += f"; RSS <= 150 MiB: {'met' if s.rss_live <= 150 else 'NOT met'}"
        print(
            f"{s.name:24}{s.issue.rate:>9.0f}{_p(s.lags, 0.5):>8.2f}s{_p(s.lags, 0.99):>7.2f}s"
            f"{max(s.lags, default=float('nan')):>7.2f}s{s.rate:>11.0f}"
            f"{s.rate / raw_rate if raw_rate else 0:>7.2f}x{s.rss_live:>8.0f}Mi"
            f"{s.rss_after:>5.0f}Mi  {verdict}"
            + (
                f"  ERRORS issue {s.issue.errors}, unrevoked {s.unrevoked}, "
                f"revoke_failed {s.failures}, late {s.late_issues}"
                if errors
                else ""
            )
        )
    if flagged:
        print("\nTHIS RUN HAD ERRORS: its figures are not comparable.")


if __name__ == "__main__":
    main(sys.argv[1:])
