"""GET /metrics (the Prometheus text format) and the per-request counts and timings behind it.
Open like /readyz unless `[server] metrics_token` is set; then a scraper sends it as a bearer
token. Requests are labelled by their route (the endpoint's name), never by their path, which
holds grant ids."""

from __future__ import annotations

import hmac
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import (
    BrokerError,
    DatabaseUnavailable,
    ProviderUnavailable,
    StoreUnavailable,
    Unauthenticated,
    VaultUnavailable,
)
from . import services

bp = Blueprint("metrics", __name__)
DEPENDENCIES = {
    VaultUnavailable: "vault",
    DatabaseUnavailable: "database",
    ProviderUnavailable: "provider",
    StoreUnavailable: "store",
}


@bp.get("/metrics")
def metrics() -> Response:
    expected = current_app.extensions["jit"].settings.server["metrics_token"]
    if expected:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            raise Unauthenticated("send the metrics token as Authorization: Bearer")
    response = Response(services().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
    response.headers["Cache-Control"] = "no-store"
    return response


def count_dependency_error(exc: BrokerError) -> None:
    """Called by the error handler for every refusal: those a dependency caused are counted."""
    for kind, name in DEPENDENCIES.items():
        if isinstance(exc, kind):
            services().metrics.dependency_errors.labels(name).inc()
            return


def init_app(app: Flask) -> None:
    """After request_ids.init_app: a request's start is stamped there, once."""
    app.register_blueprint(bp)
    app.after_request(_answered)


def _answered(response: Response) -> Response:
    started = g.get("request_began")
    jit = current_app.extensions.get("jit")
    if started is None or jit is None:
        return response
    endpoint = request.endpoint or "unmatched"  # a 404's path is whatever the sender chose
    method = request.method if request.method in KNOWN_METHODS else "other"
    jit.metrics.http_requests.labels(endpoint, method, str(response.status_code)).inc()
    jit.metrics.http_seconds.labels(endpoint, method).observe(time.perf_counter() - started)
    return response


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
