"""The plain helpers the tests share: who asks, the policies they ask under, the settings of a
broker under test, what OpenBao and PostgreSQL really hold, a grant's chain, and a browser logged
in through the real provider; local HTTP endpoints playing a webhook receiver and a provider's
JWKS. Functions, constants and those endpoints only: fixtures live in conftest.py, and no test
module imports another."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import hvac
import hvac.exceptions
import jwt
import psycopg
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.config import load_settings
from broker.models import Principal, utcnow
from broker.store import SqliteStore, Store
from scripts.launchers import follow_login

# --- who asks, and when ---------------------------------------------------------------------------

ALICE = Principal("https://idp", "alice", groups=("engineers",), email="alice@example.com")
LATER = timedelta(minutes=3)  # past the grace an issuance in flight gets

# A provider client whose tokens live two seconds (conftest's oidc_provider registers it).
EXPIRING_AGENT = "expiring-agent"


# --- policies -------------------------------------------------------------------------------------

TEST_POLICY = """
[entitlements.kv-read]
description = "Read the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]

[entitlements.kv-read.reason]
min_length = 1

[entitlements.kv-admin]
description = "Change the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "15m"

[entitlements.kv-admin.requesters]
groups = ["security"]
"""

APPROVAL_POLICY = """
[entitlements.db-admin]
description = "Administer the test database"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"
default_duration = "10m"

[entitlements.db-admin.requesters]
groups = ["engineers"]

[entitlements.db-admin.reason]
min_length = 5
ticket = "^(INC|CHG)-\\\\d+$"

[entitlements.db-admin.approval]
required = 1
from_groups = ["security"]
expires_after = "1h"

[entitlements.stretchy]
description = "Extendable in steps"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "10m"

[entitlements.stretchy.requesters]
groups = ["engineers"]

[entitlements.stretchy.extend]
max_step = "5m"
max_total = "20m"

[entitlements.oncall-fix]
description = "Auto-approved for the on-call people"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "30m"
max_active = 1

[entitlements.oncall-fix.requesters]
groups = ["engineers"]

[entitlements.oncall-fix.approval]
required = 1
from_groups = ["security"]
auto_approve_groups = ["security"]

[entitlements.two-keys]
description = "Needs security and a DBA"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.two-keys.requesters]
groups = ["engineers"]

[entitlements.two-keys.approval]
required = 2
from_groups = ["security", "dba"]
each_of = ["security", "dba"]
expires_after = "1h"
"""

# The browser tests' broker: one without approval (extendable), one that needs an approval and a
# ticket, one with the emergency path.
UI_POLICY = """
[entitlements.kv-read]
description = "Read the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "1h"
default_duration = "15m"

[entitlements.kv-read.requesters]
groups = ["engineers"]

[entitlements.kv-read.extend]
max_step = "15m"
max_total = "2h"

[entitlements.db-admin]
description = "Administer the test database"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"
default_duration = "30m"

[entitlements.db-admin.requesters]
groups = ["engineers"]

[entitlements.db-admin.reason]
min_length = 5
ticket = "^(INC|CHG)-\\\\d+$"

[entitlements.db-admin.approval]
required = 1
from_groups = ["security"]
expires_after = "1h"

[entitlements.prod-fix]
description = "Emergency write access to the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "30m"

[entitlements.prod-fix.requesters]
groups = ["security"]

[entitlements.prod-fix.break_glass]
groups = ["engineers"]
reviewers = ["security"]
max_duration = "15m"
"""

DATABASE_POLICY = """
[entitlements.db-read]
description = "Read the test database"
backend = "database"
max_duration = "1h"

[entitlements.db-read.requesters]
groups = ["engineers"]

[entitlements.db-read.database]
role = "readonly"

[entitlements.db-read.extend]
max_step = "30m"
max_total = "2h"
"""


TASK_GITHUB = "https://tools.internal/github"
TASK_WIKI = "http://127.0.0.1:9/wiki"
# Two tools and a task entitlement for ci-agent over both, for the task and token-exchange tests.
TASK_TOOLS = f"""
[tools.github]
resource = "{TASK_GITHUB}"
scopes = ["issues:read", "issues:write"]
introspection_client = "github-tool"

[tools.wiki]
resource = "{TASK_WIKI}"
scopes = ["pages:read"]
max_token_lifetime = "2m"
"""
TRIAGE_TASK = """
[entitlements.triage]
description = "An agent triages issues for a person"
backend = "tool_task"
max_duration = "1h"

[entitlements.triage.requesters]
groups = ["engineers"]

[entitlements.triage.task]
agents = ["ci-agent"]
tools = { github = ["issues:read", "issues:write"], wiki = ["pages:read"] }
"""


# --- the store under test: JIT_TEST_STORE=sqlite (the default) or postgres ---------------------

STORE = os.environ.get("JIT_TEST_STORE", "sqlite")
if STORE not in ("sqlite", "postgres"):
    raise RuntimeError(f"JIT_TEST_STORE must be sqlite or postgres, not {STORE!r}")
sqlite_only = pytest.mark.skipif(STORE != "sqlite", reason="a SQLite file's own behaviour")
postgres_only = pytest.mark.skipif(STORE != "postgres", reason="the PostgreSQL store's own")

# The test PostgreSQL's superuser DSN (conftest's `store_under_test` sets it when the suite runs on
# PostgreSQL), the database the suite's brokers use, and the schemas made in it so far.
_postgres: dict[str, object] = {"dsn": "", "made": set()}
TEST_DATABASE = f"jit_tests_{os.getpid()}"  # a session's own, should two share one server


def use_postgres(dsn: str) -> None:
    """One database for the session (a CREATE DATABASE per test is dear): each test's brokers
    get a schema of their own in it (`store_url`)."""
    _postgres["dsn"] = dsn
    with psycopg.connect(dsn, autocommit=True) as admin:
        database = psycopg.sql.Identifier(TEST_DATABASE)
        admin.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(database))


def store_url(workdir: Path) -> str:
    """An empty schema of its own for each broker data directory, made on first use (the URL
    puts it first on the search path): every test (its tmp_path) starts on an empty store, and
    brokers sharing a data directory share it."""
    dsn = str(_postgres["dsn"])
    assert dsn, "the PostgreSQL store is not in use (JIT_TEST_STORE=postgres)"
    name = "jit_" + hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:24]
    url = urlunsplit(urlsplit(dsn)._replace(path=f"/{TEST_DATABASE}"))
    made = _postgres["made"]
    assert isinstance(made, set)
    if name not in made:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(name)))
        made.add(name)
    return f"{url}?options=-csearch_path%3D{name}"


def drop_test_databases() -> None:
    with psycopg.connect(str(_postgres["dsn"]), autocommit=True) as admin:
        admin.execute(
            psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(TEST_DATABASE)
            )
        )
    made = _postgres["made"]
    assert isinstance(made, set)
    made.clear()


def store_at(path: Path) -> Store:
    """The store under test for a database file `path` (on PostgreSQL: the database of the data
    directory for `broker.db`, as a broker on that directory would use; else one of its own)."""
    if STORE == "sqlite":
        return SqliteStore(path)
    from broker.store.postgres import PostgresStore

    path = Path(path)
    return PostgresStore(store_url(path.parent if path.name == "broker.db" else path))


def storage_section(workdir: Path) -> dict:
    """`[storage]` of a broker on `workdir` under the store under test."""
    return {"url": store_url(workdir)} if STORE == "postgres" else {}


# --- the broker under test ------------------------------------------------------------------------


def broker_sections(
    workdir: Path, openbao, oidc_provider, broker_port: int, client_secret: str
) -> dict[str, dict]:
    """The settings of a broker on `workdir` against the test's OpenBao and provider."""
    return {
        "server": {"base_url": f"http://127.0.0.1:{broker_port}", "data_dir": str(workdir)},
        "oidc": {
            "issuer": oidc_provider.issuer,
            "client_id": "jit-broker",
            "client_secret": client_secret,
            "api_audience": "urn:jit-broker:api",
        },
        "vault": {"addr": openbao.addr, "token": openbao.broker_token},
        "policy": {"path": str(workdir / "policy.toml")},
        **({"storage": storage_section(workdir)} if STORE == "postgres" else {}),
    }


def broker_settings(
    workdir: Path,
    openbao,
    oidc_provider,
    broker_port: int,
    client_secret: str,
    policy_text: str = "",
    **overrides,
):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "policy.toml").write_text(policy_text or TEST_POLICY)
    sections = broker_sections(workdir, openbao, oidc_provider, broker_port, client_secret)
    sections["reaper"] = {"retry_min": 1, "retry_max": 2}
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return load_settings(overrides=sections, environ={})


def grants_of(app):
    return app.extensions["jit"].grants


def health(app):
    response = app.test_client().get("/readyz")
    return response.status_code, response.get_json()


# --- a grant's chain ------------------------------------------------------------------------------


def types(grants, grant_id):
    return [entry["type"] for entry in grants.chain(grant_id)]


def verified_gone(grants, grant_id) -> bool:
    return any(e["type"] == "verify" and e["data"]["gone"] for e in grants.chain(grant_id))


def wait_for_status(grants, grant_id, status, timeout=20):
    """Poll the store until the reaper thread has moved the grant (bounded, not a timing test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        grant = grants.store.get_grant(grant_id)
        if grant.status == status:
            return grant
        time.sleep(0.1)
    raise AssertionError(f"grant {grant_id} is {grant.status}, never became {status}")


def wait_until(condition: Callable[[], bool], timeout: float = 2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def issue_unrecorded(grants, grant_id, entitlement="kv-read", backend="vault_token"):
    """What a broker killed between Vault's answer and its commit leaves behind."""
    chosen = grants.policy().entitlements[entitlement]
    return grants.backends[backend].issue(grant_id, chosen, utcnow() + timedelta(hours=1), "alice")


# --- what OpenBao holds, and bearer tokens it must refuse -----------------------------------------


def vault_as(openbao, token):
    return hvac.Client(url=openbao.addr, token=token)


def token_works(openbao, token) -> bool:
    try:
        vault_as(openbao, token).secrets.kv.v2.read_secret_version(
            "test/app", raise_on_deleted_version=True
        )
    except hvac.exceptions.Forbidden:
        return False
    return True


def live_tokens_of(openbao, grant_id) -> set[str]:
    """The accessors of every token OpenBao still holds for the grant: whatever the broker
    recorded or forgot, OpenBao's own list (tokens are tagged with `jit_grant_id`)."""
    vault = openbao.client()
    found = set()
    for accessor in vault.list("auth/token/accessors")["data"]["keys"]:
        try:
            meta = vault.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        except hvac.exceptions.InvalidRequest:
            continue  # revoked or expired between the listing and the lookup
        if meta.get("jit_grant_id") == grant_id:
            found.add(accessor)
    return found


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_header(token: str, header: object = None, raw: bytes = b"", **fields) -> str:
    """The token's claims and signature under another header: any JSON value, raw bytes, or the
    original header with `fields` changed."""
    if not raw:
        if header is None:
            header = {**jwt.get_unverified_header(token), **fields}
        raw = json.dumps(header).encode()
    _, payload, signature = token.split(".")
    return f"{_b64(raw)}.{payload}.{signature}"


# --- what PostgreSQL holds ------------------------------------------------------------------------


def connect_as(postgres, credential):
    """A session as the database user a grant was given."""
    return psycopg.connect(
        host=postgres.host,
        port=postgres.port,
        dbname=postgres.dbname,
        user=credential["username"],
        password=credential["password"],
        connect_timeout=5,
    )


def login_refused(postgres, credential) -> bool:
    try:
        connect_as(postgres, credential).close()
    except psycopg.OperationalError:
        return True
    return False


def role_exists(postgres, username) -> bool:
    with psycopg.connect(postgres.dsn) as admin:
        return bool(
            admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
        )


# --- browsers -------------------------------------------------------------------------------------

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def browser(app, username):
    """A Flask test client logged in as `username` through the real provider's login form: the
    broker's redirect, the provider's form, then the callback with the code, back on the app."""
    client = app.test_client()
    start = client.get("/auth/login")
    assert start.status_code == 302
    callback = follow_login(
        requests.Session(), start.headers["Location"], username, stop_at_redirect_uri=True
    )
    parts = urlsplit(callback)
    done = client.get(f"{parts.path}?{parts.query}")
    assert done.status_code == 302, done.get_data(as_text=True)
    return client


def page(client, path, status=200):
    response = client.get(path)
    assert response.status_code == status, response.get_data(as_text=True)
    return response.get_data(as_text=True)


def login(broker, username):
    """A requests session logged in to the live broker over real HTTP, and the page it landed on."""
    session = requests.Session()
    start = session.get(broker.url + "/auth/login", allow_redirects=False, timeout=10)
    assert start.status_code == 302
    page = follow_login(session, start.headers["Location"], username)
    return session, page


def csrf(page_text):
    return CSRF.search(page_text).group(1)


# --- an endpoint the broker POSTs to (webhooks, audit forwarding) ---------------------------------


class HttpReceiver:
    """A real local HTTP endpoint for the tests of what the broker POSTs (webhooks, audit
    forwarding): it records every request and answers as `answer` says; subclasses decide how it
    misbehaves."""

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


# --- a provider's keys, served by the test --------------------------------------------------------

AUDIENCE = "urn:jit-broker:api"  # what the JwksServer's tokens are for


class SigningKey:
    """A key of our own, named `kid`: its public JWK and tokens it signs. RS256 plays an OIDC
    provider; ES256 plays the broker's transit key (the tokens tools verify)."""

    def __init__(self, kid: str, algorithm: str = "RS256"):
        self.kid = kid
        self.algorithm = algorithm
        if algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        if self.algorithm == "ES256":
            public = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            public = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return dict(public, kid=self.kid, use="sig", alg=self.algorithm)

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
        return jwt.encode(body, self.private, algorithm=self.algorithm, headers=headers)

    def assertion(
        self, client_id: str, audience: str, headers: dict | None = None, **claims
    ) -> str:
        """A private_key_jwt client assertion (RFC 7523 §3) of `client_id` for `audience`, living
        60 s, with a fresh jti; `claims` and `headers` change or (given None) drop any member."""
        now = int(time.time())
        body = {
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(16),
            **claims,
        }
        body = {name: value for name, value in body.items() if value is not None}
        header = {"kid": self.kid, **(headers or {})}
        header = {name: value for name, value in header.items() if value is not None}
        return jwt.encode(body, self.private, algorithm=self.algorithm, headers=header)


class JwksServer:
    """A real local HTTP server playing an OIDC provider's discovery document and JWKS, for the
    tests of how the broker fetches keys: it counts the JWKS fetches, and can fail them or hold
    them back until the test lets go. Tokens are signed with keys the test makes (`SigningKey`)."""

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
