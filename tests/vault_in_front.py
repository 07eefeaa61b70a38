"""A real HTTP server standing in front of the real OpenBao: it answers the calls a test lists
with the answers the test gives (once each, in order) and passes every other call through. For
the races a real OpenBao cannot be made to lose on cue (an answer it gives only for a moment)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hvac
import requests


class VaultInFront:
    def __init__(self, vault_addr: str) -> None:
        self.vault_addr = vault_addr
        self._answers: list[tuple[str, str, int, dict, dict]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.addr = f"http://127.0.0.1:{self._server.server_address[1]}"

    def answer(
        self,
        method: str,
        path: str,
        status: int = 200,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `method path` is answered so, and not passed to OpenBao."""
        with self._lock:
            self._answers.append((method.upper(), path, status, body or {}, headers or {}))

    def unanswered(self) -> list[str]:
        with self._lock:
            return [f"{answer[0]} {answer[1]}" for answer in self._answers]

    def _take(self, method: str, path: str) -> tuple[int, dict, dict[str, str]] | None:
        with self._lock:
            for index, (m, p, status, body, headers) in enumerate(self._answers):
                if (m, p) == (method, path):
                    del self._answers[index]
                    return status, body, headers
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                given = front._take(self.command, self.path.split("?")[0])
                extra: dict[str, str] = {}
                if given is not None:
                    status, payload, kind = given[0], json.dumps(given[1]).encode(), None
                    extra = given[2]
                else:
                    passed = requests.request(
                        self.command,
                        front.vault_addr + self.path,
                        data=sent,
                        headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                        timeout=10,
                    )
                    status, payload = passed.status_code, passed.content
                    kind = passed.headers.get("Content-Type")
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = _any  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    @contextmanager
    def serving(self) -> Iterator[VaultInFront]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


@contextmanager
def in_front_of(client: hvac.Client) -> Iterator[VaultInFront]:
    """`client` talks to a VaultInFront of its OpenBao while inside; every answer given must
    have been asked for by the end."""
    vault_addr = client.url
    front = VaultInFront(vault_addr)
    with front.serving():
        client.url = front.addr
        try:
            yield front
        finally:
            client.url = vault_addr
    assert front.unanswered() == [], "answers given but never asked for"
