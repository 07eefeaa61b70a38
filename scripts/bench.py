"""The broker's cost over the raw Vault call, measured in one run against one OpenBao: issuing
(policy, two transactions, audit hashing, then the token create) against a bare token create, and
removal (release, revoke, verify, audit) against a bare revoke and lookup, and an agent's token
exchange (issue 12: task lookup, claims, transit signing, one transaction with the token's record
and chain entry) against a bare transit sign of a token's signing input. The bench runs no OIDC
provider: the exchange is `grants.exchange` with the agent's Principal as the token endpoint
would pass it after verifying the actor token (that local JWT check and authlib's form parsing
are left out). Prints ratios; asserts nothing, because a timing is a measurement, not a test."""

from __future__ import annotations

import base64
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker import audit  # noqa: E402
from broker.backends import POLICY_KINDS, make_backends  # noqa: E402
from broker.backends.vault import TOKEN_ROLE  # noqa: E402
from broker.grants import Grants  # noqa: E402
from broker.models import Principal  # noqa: E402
from broker.oauth.signing import TokenSigner  # noqa: E402
from broker.policy import PolicyFile  # noqa: E402
from broker.store import SqliteStore, Store  # noqa: E402
from scripts.launchers import OpenBao, Postgres, configure_transit_engine  # noqa: E402

POLICY = """
[entitlements.bench]
vault_policies = ["default"]
max_duration = "1h"

[entitlements.bench.requesters]
groups = ["bench"]

[tools.bench]
resource = "https://tools.bench/api"
scopes = ["read"]

[entitlements.bench-task]
backend = "tool_task"
max_duration = "1h"
[entitlements.bench-task.requesters]
groups = ["bench"]
[entitlements.bench-task.task]
agents = ["bench-agent"]
tools = { bench = ["read"] }
"""
BENCHER = Principal("https://bench", "bencher", groups=("bench",), email="bench@example.com")
AGENT = Principal("https://bench", "bench-agent", kind="agent", client_id="bench-agent")
TOOL = "https://tools.bench/api"


def timed(step, count: int) -> tuple[float, list]:
    """Median seconds per call over `count` calls, and what the calls returned."""
    durations, results = [], []
    for _ in range(count):
        started = time.perf_counter()
        results.append(step())
        durations.append(time.perf_counter() - started)
    return statistics.median(durations), results


def peak_bytes(step, count: int) -> int:
    """Peak traced memory per call while making `count` calls (the results are kept alive)."""
    tracemalloc.start()
    kept = [step() for _ in range(count)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del kept
    return peak // count


def main(count: int, postgres: Postgres | None = None) -> None:
    """With `postgres`, the broker's store is that server (the clock the database's, as for
    replicas); else a SQLite file."""
    workdir = Path(tempfile.mkdtemp(prefix="jit-bench-"))
    bao = OpenBao.start(workdir=workdir)
    try:
        configure_transit_engine(bao.client())
        # The broker's own least-privilege token, as in production; the raw calls use it too.
        client = bao.client(bao.make_broker_token(["default"]))
        signer = TokenSigner(client, "https://bench")
        (workdir / "policy.toml").write_text(POLICY)
        store: Store
        if postgres is not None:
            from broker.store.postgres import PostgresStore

            store = PostgresStore(postgres.dsn)
        else:
            store = SqliteStore(workdir / "broker.db")
        grants = Grants(
            store,
            PolicyFile(workdir / "policy.toml", POLICY_KINDS).current,
            make_backends(client),
            fingerprint_key=b"k" * 32,
            clock=store.now,
        )
        grants.store.migrate()

        def raw_issue():
            return client.auth.token.create(
                role_name=TOKEN_ROLE,
                policies=["default"],
                ttl="600s",
                explicit_max_ttl="600s",
                renewable=False,
                meta={"jit_grant_id": "bench"},
            )["auth"]["accessor"]

        def broker_issue():
            return grants.request(BENCHER, "bench", "10m", "benchmark")[0]

        def raw_remove(accessor):
            client.auth.token.revoke_accessor(accessor)
            try:
                client.auth.token.lookup_accessor(accessor)
            except Exception:  # noqa: BLE001 - gone is the expected answer
                return True
            return False

        raw_issue_s, accessors = timed(raw_issue, count)
        broker_issue_s, issued = timed(broker_issue, count)
        raw_remove_s, _ = timed(lambda: raw_remove(accessors.pop()), count)
        removal = iter(issued)

        def broker_remove():
            grant = grants.release(BENCHER, next(removal).id)
            grants.reap_due()
            return grant

        broker_remove_s, _ = timed(broker_remove, count)
        task, credential = grants.request(
            BENCHER, "bench-task", "1h", "benchmark", agent="bench-agent", tools={"bench": ["read"]}
        )
        assert credential is not None, task.status
        subject_token = credential.secret
        # A token's signing input, as the signer makes it: a bare sign of the same size.
        sample = grants.exchange(AGENT, subject_token, TOOL, "read", signer.issue).access_token
        signing_input = base64.b64encode(sample.rsplit(".", 1)[0].encode()).decode()

        def raw_sign():
            return client.secrets.transit.sign_data(
                signer.key_name,
                hash_input=signing_input,
                hash_algorithm="sha2-256",
                marshaling_algorithm="jws",
                mount_point=signer.mount,
            )["data"]["signature"]

        def broker_exchange():
            return grants.exchange(AGENT, subject_token, TOOL, "read", signer.issue).access_token

        raw_sign_s, _ = timed(raw_sign, count)
        broker_exchange_s, _ = timed(broker_exchange, count)
        raw_peak = peak_bytes(raw_issue, count // 4 or 1)
        broker_peak = peak_bytes(broker_issue, count // 4 or 1)
        chain_ok = audit.verify(grants.store.audit_entries())

        rows = [
            ("issue (request -> token)", raw_issue_s, broker_issue_s),
            ("remove (release -> verified)", raw_remove_s, broker_remove_s),
            ("token exchange (-> signed)", raw_sign_s, broker_exchange_s),
        ]
        print(f"jit-broker bench: {count} grants against OpenBao at {bao.addr}")
        if isinstance(store, SqliteStore):
            print(f"store: SQLite (WAL, synchronous={store.synchronous}) in {workdir}\n")
        else:
            print("store: PostgreSQL (the launcher's throwaway cluster, on this machine)\n")
        print(f"{'':32}{'raw Vault':>12}{'broker':>12}{'ratio':>9}")
        for name, raw, broker in rows:
            print(f"{name:32}{raw * 1000:>10.2f}ms{broker * 1000:>10.2f}ms{broker / raw:>8.2f}x")
        print(
            f"{'memory per issue (peak)':32}{raw_peak / 1024:>10.1f}KB"
            f"{broker_peak / 1024:>10.1f}KB{broker_peak / max(raw_peak, 1):>8.2f}x"
        )
        print(f"\naudit chain after the run: {chain_ok}")
    finally:
        bao.stop()


if __name__ == "__main__":
    args = [arg for arg in sys.argv[1:] if arg != "--postgres"]
    count = int(args[0]) if args else 200
    if "--postgres" not in sys.argv:
        main(count)
    else:
        server = Postgres.from_env_or_start()
        try:
            main(count, server)
        finally:
            server.stop()
