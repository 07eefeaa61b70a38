"""How the broker logs: plain text for people (the default, and `scripts/dev`), or one JSON object a
line for a log pipeline (`[server] log_format = "json"`), each line carrying the id of the request
it was written for. What is logged is the broker's own sentences and the request's method, route
path and status: never a query string (an authorization code rides in one), a body or a header."""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# A client's own X-Request-Id is kept only when it is short and plain (it goes into every line).
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")


def request_id_from(header: str | None) -> str:
    """The client's X-Request-Id when it is safe to repeat, else a new one."""
    if header and REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the Flask request being served ("-" outside one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Send the root logger's records to stderr in `log_format` (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    use_format(handler, log_format)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def use_format(handler: logging.Handler, log_format: str) -> None:
    """Make `handler` write `log_format` lines with request ids (also gunicorn's own handlers)."""
    handler.addFilter(RequestIdFilter())
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))


def _current_request_id() -> str:
    from flask import g, has_request_context

    if has_request_context():
        return str(g.get("request_id", "-"))
    return "-"
