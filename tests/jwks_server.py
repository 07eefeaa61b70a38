"""A real local HTTP server playing an OIDC provider's discovery document and JWKS, for the tests
of how the broker fetches keys: it counts the JWKS fetches, and can fail them or hold them back
until the test lets go. Tokens are signed with keys the test makes (`SigningKey`)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "urn:jit-broker:api"


class SigningKey:
    """An RSA key of our own, named `kid`: its public JWK and tokens it signs."""

    def __init__(self, kid: str):
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return dict(public, kid=self.kid, use="sig", alg="RS256")

    def token(self, issuer: str, kid: str | None = None, **claims) -> str:
        now = int(time.time())
        body = {
            "iss": issuer,
            "aud": AUDIENCE,
            "sub": "alice",
            "client_id": "jit-cli",
            "iat": now,
            "exp": now + 300,
            **claims,
        }
        headers = {"typ": "at+jwt", "kid": kid or self.kid}
        return jwt.encode(body, self.private, algorithm="RS256", headers=headers)


class JwksServer:
    def __init__(self, keys: list[SigningKey]):
        self.keys = keys  # what the JWKS lists now; the test may change it
        self.status = 200
        self.cache_control = ""  # the JWKS answer's Cache-Control header ("": none)
        self.hang = False  # hold each JWKS fetch until `release` is set
        self.fetches = 0  # JWKS requests received
        self.arrived = threading.Event()  # a JWKS request is being held back
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/.well-known/openid-configuration":
                    self._send(200, {"issuer": jwks.issuer, "jwks_uri": f"{jwks.issuer}/jwks"})
                    return
                with jwks._lock:
                    jwks.fetches += 1
                if jwks.hang:
                    jwks.arrived.set()
                    jwks.release.wait(60)
                body = {"keys": [key.jwk() for key in jwks.keys]}
                headers = {"Cache-Control": jwks.cache_control} if jwks.cache_control else {}
                self._send(jwks.status, body if jwks.status == 200 else {}, headers)

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args) -> None:
                pass

        return Handler
