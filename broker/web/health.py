"""GET /healthz: whether the broker can keep its promises, and why not. No authentication: it
names grant ids and counters, never a requester, a handle or a secret."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from . import services

bp = Blueprint("health", __name__)

# Any of these failing means the broker cannot remove access as promised, or issues nothing.
CRITICAL = ("store", "reaper", "revoke_failed")


@bp.get("/healthz")
def healthz() -> Response:
    jit = services()
    checks = jit.grants.health(deep=True)
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
    # Informational: a forwarding outage degrades health but never stops issuing (the log in
    # the store is the record); `lag` and `last_error` tell the operator how far behind it is.
    checks["forward"] = jit.forwarder.health()
    # Degrades, never fails: without its signing key the broker signs no access token for tools,
    # but it still removes access as promised and issues every other credential.
    checks["signing"] = jit.signer.health()
    if any(not checks[name]["ok"] for name in CRITICAL):
        status = "failing"
    elif all(check["ok"] for check in checks.values()) and checks["reaper"].get("enabled", True):
        status = "ok"
    else:
        status = "degraded"
    response = jsonify(status=status, checks=checks)
    response.status_code = 503 if status == "failing" else 200
    response.headers["Cache-Control"] = "no-store"
    return response
