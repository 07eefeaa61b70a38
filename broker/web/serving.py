"""The HTTP server's own answers. werkzeug's server (used by `jit serve`) refuses some requests
itself, in http.server, before Flask sees them: a request line or a header line over its limits,
too many headers, a malformed request line. http.server answers those with an HTML page; under
/api/ a client expects the API's JSON error, so this handler gives that instead."""

from __future__ import annotations

import json
from http import HTTPStatus
from urllib.parse import urlsplit

from werkzeug.serving import WSGIRequestHandler

API_PREFIX = "/api/"


class RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, with http.server's error pages as JSON `{"error", "detail"}` for
    /api/ paths (what web/__init__.py answers for errors Flask sees)."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if not self._asks_api():
            super().send_error(code, message, explain)
            return
        try:
            status = HTTPStatus(code)
            name, detail = status.phrase, explain or status.description
        except ValueError:
            name, detail = message or "error", explain or ""
        body = json.dumps(
            {"error": name.lower().replace(" ", "_").replace("-", "_"), "detail": detail}
        ).encode()
        if self.request_version == "HTTP/0.9" and len(self.raw_requestline.split()) > 2:
            # http.server assumes HTTP/0.9 (no status line, no headers) until it has read a valid
            # version; a client that sent a bad one still needs the status and the content type.
            self.request_version = "HTTP/1.0"
        self.log_error("code %d, message %s", code, message)
        self.send_response(code, message)
        self.send_header("Connection", "close")
        self.close_connection = True
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 205, 304):
            self.wfile.write(body)

    def _asks_api(self) -> bool:
        """Whether the request (as far as it was read) is for the API: from raw_requestline, which
        holds this request's line even when it was too long or malformed to parse (`self.path` may
        still be the previous request's on a kept-alive connection)."""
        words = getattr(self, "raw_requestline", b"").split(maxsplit=2)
        path = words[1].decode("latin-1") if len(words) > 1 else ""
        try:
            return urlsplit(path).path.startswith(API_PREFIX)
        except ValueError:  # not a URL at all
            return path.startswith(API_PREFIX)
