"""GET /healthz (alive: restart me if not) and GET /readyz (send me work, or not, and why). No
authentication: they name grant ids and counters, never a requester, a handle or a secret."""

from __future__ import annotations

import os
import threading
from collections import Counter

from flask import Blueprint, Response, jsonify

from . import services

bp = Blueprint("health", __name__)

# Without any of these the broker cannot issue or remove as promised: a load balancer should send
# its work to another replica (503). Every other check is an alert: it degrades the status but
# leaves the replica in service, since every replica would fail it at once (an unverified
# removal, a dropped notification, a forwarding outage, a missing token or checkpoint signing key).
REQUIRED = ("store", "reaper", "reaper_lag", "vault", "provider")


@bp.get("/healthz")
def healthz() -> Response:
    """Also which process answered and the broker's threads in it: one reaper, notifier and
    forwarder per process, whatever the server's worker model."""
    reaper = services().grants.liveness()
    alive = reaper["ok"]
    body: dict[str, object] = {"status": "alive" if alive else "failing"}
    if not alive:
        body["checks"] = {"reaper": reaper}
    threads = Counter(t.name for t in threading.enumerate() if t.name.startswith("jit-"))
    body.update(process=os.getpid(), threads=dict(sorted(threads.items())))
    return _answer(body, 200 if alive else 503)


@bp.get("/readyz")
def readyz() -> Response:
    checks = _checks()
    if any(_blocks(checks[name]) for name in REQUIRED if name in checks):
        status = "failing"
    elif all(check["ok"] for check in checks.values()) and checks["reaper"].get("enabled", True):
        status = "ok"
    else:
        status = "degraded"
    alerts = sorted(name for name, check in checks.items() if not check["ok"])
    return _answer(
        {"status": status, "alerts": alerts, "checks": checks}, 503 if status == "failing" else 200
    )


def _blocks(check: dict) -> bool:
    """Vault's check fails readiness only when Vault cannot be used: its own token lapsing
    soon is an alert (the operator renews it), not a reason to stop."""
    return not check.get("reachable", check["ok"])


def _checks() -> dict[str, dict]:
    jit = services()
    checks = jit.grants.health(deep=True)
    checks["provider"] = jit.metadata.health()
    policy_error = jit.policy.last_error
    checks["policy"] = {"ok": not policy_error, **({"error": policy_error} if policy_error else {})}
    notifier = jit.notifier
    checks["notifier"] = {
        "ok": notifier.dropped == 0,
        "enabled": notifier.enabled,
        "delivered": notifier.delivered,
        "failed_attempts": notifier.failed_attempts,
        "dropped": notifier.dropped,
        "pending": notifier.pending(),
    }
    # A forwarding outage never stops issuing (the log in the store is the record); `lag` and
    # `last_error` tell the operator how far behind it is.
    checks["forward"] = jit.forwarder.health()
    # Without its signing key the broker signs no access token for tools, but it still removes
    # access as promised and issues every other credential.
    checks["signing"] = jit.signer.health()
    # Without checkpoint signing (the transit key missing, a token that may not sign) the chain
    # is still written, and signed all at once when it can be; `unsigned` says how far behind.
    checks["checkpoints"] = jit.audit_log.health()
    return checks


def _answer(body: dict, status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response
