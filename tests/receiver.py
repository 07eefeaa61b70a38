"""A real local HTTP endpoint for the tests of what the broker POSTs (webhooks, audit forwarding):
it records every request and answers as `answer` says; subclasses decide how it misbehaves."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HttpReceiver:
    def __init__(self, port: int = 0, path: str = "/"):
        self.port, self.path = port, path
        self.bodies: list[dict] = []  # every POST in arrival order, answered 2xx or not
        self.headers: list[dict] = []
        self.accepted: list[dict] = []  # the bodies answered 2xx, in order
        self.arrived = threading.Event()
        self.release = threading.Event()  # ends a held-back answer early: teardown never waits
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def answer(self, body: dict) -> tuple[int, float]:
        """The status for one request and how many seconds to hold it back first."""
        return 200, 0.0

    def start(self) -> None:
        """Listen (again, on the same port after a stop)."""
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{self.path}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.bodies.append(body)
                receiver.headers.append(dict(self.headers))
                receiver.arrived.set()
                status, delay = receiver.answer(body)
                if delay:
                    receiver.release.wait(delay)
                if 200 <= status < 300:
                    receiver.accepted.append(body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender gave up waiting and hung up

            def log_message(self, *args) -> None:
                pass

        return Handler
