"""`scripts/bench --floor`: what the serving stack alone costs, next to the raw OpenBao call, in one
run. A bare Flask app under gunicorn gthread (the worker `jit serve` runs) answering (a) nothing,
(b) one token create through hvac, the whole of its work, and (c) the same create over a bare
`http.client` connection kept open (the leanest HTTP client Python has: no hvac, no requests),
from one keep-alive client; then (d) a revoke by accessor and the lookup proving it gone over that
bare connection, against the same two raw calls through hvac. No broker can answer an issue
faster than (b) on this stack, nor faster than (c) in Python under gunicorn and Flask, nor prove
a removal faster than (d): the floors under issue 15's "issue p50 <= 1.5x raw" at one client and
"release -> verified p50 <= 1.5x raw". A measurement, not a test."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hvac
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_http import revoke_and_look  # noqa: E402
from scripts.launchers import OpenBao, free_port  # noqa: E402

CREATE = {"policies": ["default"], "ttl": "600s", "renewable": False, "meta": {"bench": "floor"}}

# The app gunicorn serves: nothing of the broker's, only Flask and hvac.
APP = """
import http.client
import json
import os
import threading
import hvac
from flask import Flask, jsonify, request

app = Flask(__name__)
client = hvac.Client(url=os.environ["BENCH_BAO_ADDR"], token=os.environ["BENCH_BAO_TOKEN"])
CREATE = {create!r}


@app.post("/nothing")
def nothing():
    return jsonify(ok=True)


@app.post("/token")
def token():
    auth = client.auth.token.create(**CREATE)["auth"]
    return jsonify(accessor=auth["accessor"], token=auth["client_token"])


kept = threading.local()
HEADERS = {{"X-Vault-Token": os.environ["BENCH_BAO_TOKEN"], "Content-Type": "application/json"}}


def bare():  # this thread's kept-open connection to OpenBao, made at its first call
    if not hasattr(kept, "connection"):
        host, port = os.environ["BENCH_BAO_ADDR"].split("//")[1].split(":")
        kept.connection = http.client.HTTPConnection(host, int(port))
    return kept.connection


@app.post("/token-lean")
def token_lean():
    connection = bare()
    connection.request("POST", "/v1/auth/token/create", json.dumps(CREATE), HEADERS)
    auth = json.loads(connection.getresponse().read())["auth"]
    return jsonify(accessor=auth["accessor"], token=auth["client_token"])


@app.post("/remove-lean")
def remove_lean():
    connection = bare()
    body = json.dumps({{"accessor": request.get_json()["accessor"]}})
    connection.request("POST", "/v1/auth/token/revoke-accessor", body, HEADERS)
    connection.getresponse().read()
    connection.request("POST", "/v1/auth/token/lookup-accessor", body, HEADERS)
    answer = connection.getresponse()
    answer.read()
    return jsonify(gone=answer.status == 400)
"""


def percentiles(call: Callable[[], object], count: int) -> tuple[float, float]:
    """p50 and p99 in ms of `count` calls, after a warm-up."""
    for _ in range(min(50, count)):
        call()
    took = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        took.append(time.perf_counter() - start)
    took.sort()
    return took[len(took) // 2] * 1000, took[min(len(took) - 1, int(0.99 * len(took)))] * 1000


def serve(workdir: Path, bao: OpenBao, threads: int) -> tuple[subprocess.Popen, str]:
    (workdir / "floor_app.py").write_text(APP.format(create=CREATE))
    port = free_port()
    env = dict(os.environ, BENCH_BAO_ADDR=bao.addr, BENCH_BAO_TOKEN=bao.root_token)
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    argv = [gunicorn, "-k", "gthread", "-w", "1", "--threads", str(threads), "--keep-alive", "5"]
    argv += ["-b", f"127.0.0.1:{port}", "--chdir", str(workdir), "floor_app:app"]
    server = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)  # noqa: S603 - ours
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.post(f"{url}/nothing", timeout=1).raise_for_status()
            return server, url
        except requests.RequestException:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                raise SystemExit("the floor app did not start") from None
            time.sleep(0.2)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench --floor")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads (1 worker)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jit-floor-") as tmp:
        bao = OpenBao.start(workdir=Path(tmp))
        server, url = serve(Path(tmp), bao, args.threads)
        try:
            raw_client = hvac.Client(url=bao.addr, token=bao.root_token)
            session = requests.Session()
            count = args.count
            raw = percentiles(lambda: raw_client.auth.token.create(**CREATE), count)
            nothing = percentiles(lambda: session.post(f"{url}/nothing").raise_for_status(), count)
            floor = percentiles(lambda: session.post(f"{url}/token").raise_for_status(), count)
            lean = percentiles(lambda: session.post(f"{url}/token-lean").raise_for_status(), count)
            accessors = iter(
                [
                    raw_client.auth.token.create(**CREATE)["auth"]["accessor"]
                    for _ in range(count * 2 + 100)
                ]
            )
            raw_removal = percentiles(lambda: revoke_and_look(raw_client, next(accessors)), count)
            lean_removal = percentiles(lambda: lean_remove(session, url, next(accessors)), count)
        finally:
            server.terminate()
            server.wait()
            bao.stop()
    print(f"gunicorn gthread 1 x {args.threads}, Flask, hvac; 1 keep-alive client, {count} calls")
    print(f"{'what':40} {'p50 ms':>8} {'p99 ms':>8} {'p50 vs raw':>11}")
    for name, (p50, p99) in (
        ("raw token create (hvac)", raw),
        ("Flask answering nothing", nothing),
        ("Flask + one hvac token create (floor)", floor),
        ("Flask + one http.client token create", lean),
    ):
        print(f"{name:40} {p50:8.2f} {p99:8.2f} {p50 / raw[0]:10.2f}x")
    for name, (p50, p99) in (
        ("raw revoke + lookup (hvac)", raw_removal),
        ("Flask + revoke + lookup over http.client", lean_removal),
    ):
        print(f"{name:40} {p50:8.2f} {p99:8.2f} {p50 / raw_removal[0]:10.2f}x")


def lean_remove(session: requests.Session, url: str, accessor: str) -> None:
    answer = session.post(f"{url}/remove-lean", json={"accessor": accessor})
    answer.raise_for_status()
    if not answer.json()["gone"]:
        raise RuntimeError("the token survived its revocation")


if __name__ == "__main__":
    main(sys.argv[1:])
