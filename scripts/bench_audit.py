"""The audit log at scale (issue 15): `jit audit verify`'s work against a plain SHA-256 loop over
the same stored bytes, the chain walk as it was before (every entry decoded and encoded again),
`jit audit lookup` through its index, an auditor page's timeline, and the auditor pages
themselves over HTTP: `jit serve` (with OpenBao and the OIDC provider) on the very store, frank
(an auditor) logged in through the provider's form, each page GET timed (the dashboard after a
restart of jit serve: the first load after a start). Fills the store with N entries shaped like
the broker's (a grant's request, decision, issue with a token accessor's HMAC, release, verified
removal), one a second up to now (so the dashboard's 14 days hold them); on PostgreSQL, then
gathers the planner's statistics. Prints figures; asserts nothing."""

from __future__ import annotations

import hashlib
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urljoin

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker import audit  # noqa: E402
from broker.audit.log import AuditLog  # noqa: E402
from broker.models import isoformat  # noqa: E402
from broker.store import SqliteStore, Store  # noqa: E402
from broker.store.base import _insert  # noqa: E402
from scripts.bench_http import Stack, served  # noqa: E402
from scripts.launchers import Postgres, follow_login  # noqa: E402

KEY = b"k" * 32
BATCH = 5000  # entries a transaction while filling
ACTOR = {"iss": "https://idp.example.com", "sub": "alice", "email": "alice@example.com"}
BROKER = {"iss": "jit-broker", "sub": "broker"}


def fill(store: Store, count: int) -> list[str]:
    """`count` entries, five a grant, one a second ending now; the token accessors used (looked
    up afterwards)."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=count)
    accessors: list[str] = []
    n, ended = 0, ""
    while n < count:
        with store.transaction() as tx:
            for _ in range(min(BATCH, count - n)):
                grant, step = f"g-{n // 5:08d}", n % 5
                at = isoformat(start + timedelta(seconds=n))  # an entry a second
                if step == 0:
                    data = {"entitlement": "db-read", "reason": "CHG-1234 investigate slow query",
                            "duration": 3600, "ticket": "CHG-1234"}  # fmt: skip
                    tx.append(at, "request", ACTOR, grant, data)
                elif step == 1:
                    tx.append(at, "decision", BROKER, grant, {"approved": True, "reasons": []})
                elif step == 2:
                    accessors.append(f"accessor-{n}")
                    mark = audit.fingerprint(KEY, accessors[-1])
                    data = {"backend": "vault", "handle": mark, "window_end": at}
                    tx.append(at, "issue", BROKER, grant, data)
                elif step == 3:
                    tx.append(at, "release", ACTOR, grant, {"window_end": at})
                    ended = at
                else:
                    data = {"gone": True, "handle": audit.fingerprint(KEY, accessors[-1])}
                    tx.append(at, "verify", BROKER, grant, data)
                    row = {"id": grant, "entitlement": "db-read", "status": "revoked",
                           "window_end": ended, "handle": accessors[-1], "created_at": at,
                           "requester_iss": ACTOR["iss"], "requester_sub": ACTOR["sub"],
                           "requester": ACTOR["email"], "reason": "CHG-1234", "duration": 3600,
                           "window_start": at, "backend": "vault_token", "policy_hash": "0" * 64,
                           "updated_at": at}  # fmt: skip
                    _insert(tx.db, "grants", row)
                n += 1
    return accessors


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds / 1000:,.0f}k entries/s ({seconds:.2f} s)"


def percentile(values: list[float], p: float) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * p))]


NEXT_PAGE = re.compile(r'<a id="next-page" href="([^"]+)">')


COUNTING = "The figures are being counted."  # the dashboard's page before its first count lands
DASHBOARD = "/audit/dashboard"


def pages(stack: Stack, count: int) -> bool:
    """The auditor pages over HTTP, as frank opens them: the grant list (first page, a filter,
    the next page), a grant's page; then the dashboard after a restart of jit serve on the filled
    store (see `dashboard_after_a_start`). p50 / p95 of each, and of all together."""
    session = requests.Session()
    start = session.get(stack.url + "/auth/login", allow_redirects=False, timeout=10)
    follow_login(session, start, "frank")
    ok = True
    grants = random.Random(3).sample(range(count // 5), min(100, count // 5))  # noqa: S311

    def timed(path: str) -> tuple[float, str]:
        nonlocal ok
        started = time.perf_counter()
        response = session.get(urljoin(stack.url, path), timeout=60)
        took = time.perf_counter() - started
        if response.status_code != 200 or "/auth/login" in response.url:
            print(f"  {path}: HTTP {response.status_code} at {response.url}")
            ok = False
        return took, response.text

    first = timed("/audit")[1]
    found = NEXT_PAGE.search(first)
    following = found.group(1).replace("&amp;", "&") if found else "/audit"
    if found is None:
        print("  /audit: no next page link")
        ok = False
    kinds = {
        "grant list, first page": ["/audit"] * 20,
        "grant list, filtered": ["/audit?status=revoked&entitlement=db-read"] * 20,
        "grant list, next page": [following] * 20,
        "a grant's page": [f"/audit/grants/g-{n:08d}" for n in grants],
    }
    every: list[float] = []
    for kind, paths in kinds.items():
        durations = [timed(path)[0] for path in paths]
        every += durations
        report(kind, durations)
    dashboard, shown = dashboard_after_a_start(stack, timed)
    every += dashboard
    p50, p95 = statistics.median(every) * 1000, percentile(every, 0.95) * 1000
    print(f"{'pages, all of the above p50 / p95':60}{p50:8.1f} ms / {p95:8.1f} ms")
    return ok and shown


def report(kind: str, durations: list[float]) -> None:
    p50, p95 = statistics.median(durations) * 1000, percentile(durations, 0.95) * 1000
    print(f"{'page: ' + kind + ' p50 / p95':60}{p50:8.1f} ms / {p95:8.1f} ms")


def dashboard_after_a_start(
    stack: Stack, timed: Callable[[str], tuple[float, str]]
) -> tuple[list[float], bool]:
    """jit serve restarted on the filled store (it was started on an empty one, to be filled
    under it), so that the first dashboard load is the first after a start, as after a deploy;
    the broker's first count starts with it, in the background. Then a load every quarter of a
    second until the figures show, and 20 loads after. Every load's time, and whether the figures
    were shown within two minutes."""
    stack.broker.restart()
    restarted = time.perf_counter()
    first, text = timed(DASHBOARD)
    answer = "being counted" if COUNTING in text else "figures" if "grants created" in text else "?"
    print(f"{'page: dashboard (14 days), first load after a start':60}{first * 1000:8.1f} ms "
          f"(answered: {answer})")  # fmt: skip
    waiting: list[float] = []
    while COUNTING in text and time.perf_counter() - restarted < 120:
        time.sleep(0.25)
        took, text = timed(DASHBOARD)
        waiting.append(took)
    shown = "grants created" in text
    if waiting:
        report(f"dashboard, {len(waiting)} loads until the figures showed", waiting)
    if shown:
        print(f"{'dashboard: the figures showed, after the restart':60}"
              f"{time.perf_counter() - restarted:8.1f} s")  # fmt: skip
    else:
        print(f"  {DASHBOARD}: no figures two minutes after the restart")
    later = [timed(DASHBOARD)[0] for _ in range(20)]
    report("dashboard (14 days), later loads", later)
    return [first, *waiting, *later], shown


def main(count: int, store: Store, label: str, stack: Stack | None = None) -> None:
    store.migrate()
    started = time.perf_counter()
    accessors = fill(store, count)
    if not isinstance(store, SqliteStore):
        # The planner's statistics, as autovacuum keeps them on a running database (right
        # after a bulk load it has none, and plans the state check's fold by guesswork).
        store.db.execute("ANALYZE")
    print(f"jit-broker audit bench: {count:,} entries, store {label}")
    print(f"filled in {time.perf_counter() - started:.1f} s\n")
    log = AuditLog(store, KEY)

    lines = [line.encode() for *_, line in store.audit_lines() if line is not None]
    started = time.perf_counter()
    for line in lines:
        hashlib.sha256(line).hexdigest()
    plain = time.perf_counter() - started
    print(f"{'plain sha256 over the stored lines':44}{rate(len(lines), plain)}")

    started = time.perf_counter()
    result = log.verify()
    chain_s = time.perf_counter() - started
    ratio = chain_s / plain
    print(f"{'chain verify (stored lines)':44}{rate(count, chain_s)}, {ratio:.1f}x the plain loop")

    started = time.perf_counter()
    problems = log.grant_problems()
    state_s = time.perf_counter() - started
    print(f"{'grants table against the chain':44}{rate(count, state_s)}")
    whole = chain_s + state_s
    print(
        f"{'jit audit verify (both)':44}{rate(count, whole)}, {whole / plain:.1f}x the plain loop"
    )

    started = time.perf_counter()
    before = audit.verify(store.audit_entries())
    before_s = time.perf_counter() - started
    print(f"{'chain verify as before (decode, re-encode)':44}{rate(count, before_s)}")
    ok = result.ok and before.ok and not problems
    print(f"  verified: {result}; as before: {before}; grant problems: {len(problems)}\n")

    picks = random.Random(1).sample(accessors, min(1000, len(accessors)))  # noqa: S311
    durations = []
    for value in [*picks, *(f"absent-{i}" for i in range(100))]:
        started = time.perf_counter()
        found = log.lookup(value)
        durations.append(time.perf_counter() - started)
        ok = ok and (len(found) == 2) == (not value.startswith("absent"))
    print(f"{'lookup p50 / p99':44}{statistics.median(durations) * 1000:.2f} ms / "
          f"{percentile(durations, 0.99) * 1000:.2f} ms ({len(durations)} lookups)")  # fmt: skip

    scans = []
    for value in picks[:20]:
        started = time.perf_counter()
        list(store.db.execute(f"SELECT seq FROM audit WHERE {store.CONTAINS}",  # noqa: S608
                              [audit.fingerprint(KEY, value)]))  # fmt: skip
        scans.append(time.perf_counter() - started)
    print(f"{'lookup as before (scan), p50':44}{statistics.median(scans) * 1000:.2f} ms")

    started = time.perf_counter()
    advanced = log.advance()
    took = time.perf_counter() - started
    print(f"{'background verification, first turn':44}{rate(advanced.checked, took)}")
    grants = random.Random(2).sample(range(count // 5), min(200, count // 5))  # noqa: S311
    durations = []
    for n in grants:
        started = time.perf_counter()
        log.timeline(f"g-{n:08d}")
        durations.append(time.perf_counter() - started)
    p50, p95 = statistics.median(durations) * 1000, percentile(durations, 0.95) * 1000
    print(f"{'grant timeline (page backend) p50 / p95':44}{p50:.2f} ms / {p95:.2f} ms")
    if stack is not None:
        print(f"\nthe auditor pages over HTTP: jit serve at {stack.url}, frank logged in")
        ok = pages(stack, count) and ok
    print("\nall answers as expected" if ok else "\nERRORS: an answer was not as expected")


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if arg not in ("--audit", "--postgres", "--scale")]
    args = [arg for arg in args if arg != "--no-pages"]
    count = 1_000_000 if "--scale" in sys.argv else int(args[0]) if args else 100_000
    # jit serve on the bench's store, its reaper off: nothing else verifies or signs meanwhile.
    quiet = {"JIT_REAPER_ENABLED": "false"}
    with_pages = "--no-pages" not in sys.argv
    if "--postgres" in sys.argv:
        from broker.store.postgres import PostgresStore

        server = Postgres.from_env_or_start()
        try:
            label = "PostgreSQL (the launcher's throwaway cluster)"
            if with_pages:
                with served("jit-bench-audit-", JIT_STORAGE_URL=server.dsn, **quiet) as stack:
                    main(count, PostgresStore(server.dsn), label, stack)
            else:
                main(count, PostgresStore(server.dsn), label)
        finally:
            server.stop()
    elif with_pages:
        with served("jit-bench-audit-", **quiet) as stack:
            path = stack.workdir / "broker" / "broker.db"  # the file jit serve uses
            sqlite = SqliteStore(path)
            main(count, sqlite, f"SQLite (WAL, synchronous={sqlite.synchronous}) at {path}", stack)
    else:
        path = Path(tempfile.mkdtemp(prefix="jit-bench-audit-")) / "broker.db"
        sqlite = SqliteStore(path)
        main(count, sqlite, f"SQLite (WAL, synchronous={sqlite.synchronous}) at {path}")
