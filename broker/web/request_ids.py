"""Every request gets an id (the client's X-Request-Id when it is plain, else a new one): it is
answered in X-Request-Id and stamped on every log line written while serving it (broker/logs.py).
Under `jit serve` each request also gets one access line here: method, path without its query
string, status, time."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, current_app, g, request

from ..logs import request_id_from

access = logging.getLogger("broker.access")
ACCESS_LOG = "JIT_ACCESS_LOG"  # app.config switch: set by `jit serve` (gunicorn logs no access)


def init_app(app: Flask) -> None:
    app.before_request(_begin)
    app.after_request(_end)


def _begin() -> None:
    g.request_id = request_id_from(request.headers.get("X-Request-Id"))
    g.request_began = time.perf_counter()


def _end(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id is None:  # failed before _begin ran
        return response
    response.headers["X-Request-Id"] = request_id
    if current_app.config.get(ACCESS_LOG):
        took = (time.perf_counter() - g.get("request_began", time.perf_counter())) * 1000
        access.info("%s %s %s %.1fms", request.method, request.path, response.status_code, took)
    return response
