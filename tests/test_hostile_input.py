"""Whatever an outsider sends the API (any body, any header, any path) is answered with a 4xx and
JSON {"error", "detail"}, never a 5xx or an HTML page, and leaves nothing behind: no grant row, no
audit entry, no token in OpenBao. Real OIDC tokens, a real OpenBao; a hypothesis fuzz of bodies and
headers on every POST endpoint; the server's own limits over real HTTP."""

from __future__ import annotations

import base64
import json
import socket
import time
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from scripts.launchers import agent_secret, client_credentials_token
from tests.helpers import TASK_GITHUB, TASK_TOOLS, TRIAGE_TASK, SigningKey, with_header

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a type name

FUZZ_POLICY = """
[entitlements.kv-read]
description = "Read the test secrets"
backend = "vault_token"
vault_policies = ["jit-test-read"]
max_duration = "1h"

[entitlements.kv-read.requesters]
groups = ["engineers"]

[entitlements.kv-read.extend]
max_step = "30m"
max_total = "1h"

[entitlements.gated]
description = "Needs a security approver; break-glass for engineers"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.gated.requesters]
groups = ["engineers"]

[entitlements.gated.reason]
min_length = 3
ticket = "^INC-\\\\d+$"

[entitlements.gated.approval]
required = 1
from_groups = ["security"]

[entitlements.gated.break_glass]
groups = ["engineers"]
reviewers = ["security"]
max_duration = "30m"
review_within = "24h"
"""

ENDPOINTS = ("approve", "deny", "review", "cancel", "activate", "extend", "release")
LONE_SURROGATE = "\ud800"


class Api:
    """An app of its own with a grant in each interesting state, and what it has recorded."""

    def __init__(self, app, tokens, openbao):
        self.app, self.tokens, self.openbao = app, tokens, openbao
        self.client = app.test_client()
        self.store = app.extensions["jit"].grants.store
        self.active = self.post_ok("alice", "/api/v1/requests", _ask("kv-read"))
        self.pending = self.post_ok("alice", "/api/v1/requests", _ask("gated", ticket="INC-1"))
        self.break_glass = self.post_ok(
            "alice", "/api/v1/requests", _ask("gated", ticket="INC-2", break_glass=True)
        )
        self.approved = self.post_ok("alice", "/api/v1/requests", _ask("gated", ticket="INC-3"))
        self.post_ok("bob", f"/api/v1/requests/{self.approved}/approve", {})

    def post(self, user, path, data: bytes, content_type="application/json", headers=None):
        sent = {"Authorization": f"Bearer {self.tokens(user)}", **(headers or {})}
        if content_type is not None:
            sent["Content-Type"] = content_type
        return self.client.post(path, data=data, headers=sent)

    def post_ok(self, user, path, body) -> str:
        response = self.post(user, path, json.dumps(body).encode())
        assert response.status_code in (200, 201), response.get_data(as_text=True)
        return response.json["id"]

    def footprint(self):
        db = self.store.db
        accessors = self.openbao.client().list("auth/token/accessors")["data"]["keys"]
        return (
            db.execute("SELECT * FROM grants ORDER BY id").fetchall(),
            db.execute("SELECT * FROM approvals ORDER BY rowid").fetchall(),
            self.store.audit_head(),
            set(accessors),
        )

    def assert_nothing_recorded(self, before) -> None:
        grants, approvals, head, accessors = self.footprint()
        assert grants == before[0], "a refused request changed a grant"
        assert approvals == before[1], "a refused request recorded an approval"
        assert head == before[2], "a refused request wrote to the audit log"
        assert accessors <= before[3], "a refused request left a token in OpenBao"


def _ask(entitlement, **more):
    return {"entitlement": entitlement, "duration": "10m", "reason": "INC work on the fire", **more}


def assert_json_error(response, status=None) -> dict:
    """A 4xx (the given one, if any) with the API's JSON error body."""
    text = response.get_data(as_text=True)
    assert 400 <= response.status_code < 500, f"{response.status_code}: {text[:300]}"
    if status is not None:
        assert response.status_code == status, text[:300]
    assert response.mimetype == "application/json", text[:300]
    body = json.loads(text)
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body


def assert_sendable_headers(response) -> None:
    """What a real HTTP server must be able to write: Latin-1, no line breaks."""
    for name, value in response.headers.items():
        value.encode("latin-1")
        assert "\n" not in value and "\r" not in value, (name, value)


@pytest.fixture
def api(make_app, tokens, openbao):
    return Api(make_app(policy_text=FUZZ_POLICY), tokens, openbao)


# --- each bad body, on each field it can reach ---------------------------------------------------

REQUEST_FIELDS = ("entitlement", "duration", "reason", "ticket", "public_key")


@pytest.mark.parametrize("bad", [LONE_SURROGATE, "a\udfffb", "nul\x00here"])
@pytest.mark.parametrize("field", [*REQUEST_FIELDS, "unknown-key"])
def test_text_that_is_not_text_is_refused_in_every_request_field(api, field, bad):
    """A lone surrogate fails when SQLite or the audit encodes it (a 500 before); NUL is refused
    alike. In a key too."""
    before = api.footprint()
    body = _ask("kv-read", ticket="INC-9")
    body[field] = bad
    for data in (_json(body), _json({**_ask("kv-read"), bad: "x"})):
        assert_json_error(api.post("alice", "/api/v1/requests", data), 400)
    api.assert_nothing_recorded(before)


@pytest.mark.parametrize(
    ("user", "endpoint", "body"),
    [
        ("bob", "approve", {"reason": LONE_SURROGATE}),
        ("bob", "deny", {"reason": LONE_SURROGATE}),
        ("bob", "deny", {"reason": "no\x00"}),
        ("bob", "review", {"outcome": "justified", "notes": LONE_SURROGATE}),
        ("bob", "review", {"outcome": LONE_SURROGATE, "notes": "fine"}),
        ("alice", "extend", {"duration": "5m", "public_key": LONE_SURROGATE}),
        ("alice", "extend", {"duration": LONE_SURROGATE}),
        ("alice", "activate", {"public_key": LONE_SURROGATE}),
    ],
)
def test_text_that_is_not_text_is_refused_in_decisions(api, user, endpoint, body):
    grant = {
        "approve": api.pending,
        "deny": api.pending,
        "review": api.break_glass,
        "extend": api.active,
        "activate": api.approved,
    }[endpoint]
    before = api.footprint()
    assert_json_error(api.post(user, f"/api/v1/requests/{grant}/{endpoint}", _json(body)), 400)
    api.assert_nothing_recorded(before)


def _nested(depth: int) -> bytes:
    return ('{"reason": ' + "[" * depth + "]" * depth + "}").encode()


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        pytest.param(_nested(20_000), "application/json", id="nested-past-the-parser"),
        pytest.param(_nested(50), "application/json", id="nested-50"),
        pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "application/json", id="objects"),
        pytest.param(b'{"entitlement": "kv-read", "duration": NaN}', "application/json", id="nan"),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": -Infinity}', "application/json", id="inf"
        ),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": ' + b"9" * 5000 + b', "reason": "x"}',
            "application/json",
            id="int-beyond-python",
        ),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": ' + b"9" * 400 + b', "reason": "x"}',
            "application/json",
            id="huge-int",
        ),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": 1e400, "reason": "x"}',
            "application/json",
            id="float-overflow",
        ),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": "10m", "reason": "ok", "reason": "other"}',
            "application/json",
            id="duplicate-key",
        ),
        pytest.param(
            b'{"entitlement": "kv-read", "duration": "10m", "reason": "\xed\xa0\x80"}',
            "application/json",
            id="utf8-encoded-surrogate",
        ),
        pytest.param(
            '{"entitlement": "kv-read", "duration": "10m", "reason": "caf\xe9"}'.encode("latin-1"),
            "application/json",
            id="latin-1",
        ),
        pytest.param(json.dumps(_ask("kv-read")).encode("utf-16"), "application/json", id="utf-16"),
        pytest.param(json.dumps(_ask("kv-read")).encode(), "text/plain", id="text-plain"),
        pytest.param(json.dumps(_ask("kv-read")).encode(), None, id="no-content-type"),
        pytest.param(
            b"entitlement=kv-read&duration=10m&reason=x",
            "application/x-www-form-urlencoded",
            id="form",
        ),
        pytest.param(
            b"--x\r\n"
            + b'Content-Disposition: form-data; name="a"\r\n\r\n1\r\n--x\r\n' * 1100
            + b"--x--\r\n",
            "multipart/form-data; boundary=x",
            id="many-form-parts",
        ),
        pytest.param(b"null", "application/json", id="null"),
        pytest.param(b'"a string"', "application/json", id="string"),
        pytest.param(b"[]", "application/json", id="array"),
        pytest.param(b"", "application/json", id="empty"),
        pytest.param(b"\x00\xff\xfe", "application/json", id="binary"),
    ],
)
def test_malformed_bodies_are_400(api, data, content_type):
    before = api.footprint()
    assert_json_error(api.post("alice", "/api/v1/requests", data, content_type), 400)
    api.assert_nothing_recorded(before)


@pytest.mark.parametrize(
    "duration",
    [
        "\u0665m",  # Arabic-Indic five
        "\uff15\uff10",  # full-width 50
        "\u0967h",  # Devanagari one
        "1h\U0001d7d8m",  # mathematical double-struck zero
        "\u200930m",  # a thin space
        9 * 10**20,
        "100000000000000000000000s",
        str(10**30),
    ],
)
def test_durations_are_ascii_and_bounded(api, duration):
    """int() and \\d accept any script's digits; only ASCII is documented. An enormous number
    overflowed the window arithmetic on extend (a 500)."""
    before = api.footprint()
    body = assert_json_error(
        api.post("alice", "/api/v1/requests", _json(_ask("kv-read", duration=duration))), 400
    )
    assert body["error"] == "invalid_duration"
    extend = f"/api/v1/requests/{api.active}/extend"
    body = assert_json_error(api.post("alice", extend, _json({"duration": duration})), 400)
    assert body["error"] == "invalid_duration"
    api.assert_nothing_recorded(before)


def test_a_valid_body_still_works(api):
    """The strict reading refuses what it must and no more: utf-8, an empty optional body, and a
    content type with a charset."""
    response = api.post(
        "alice",
        "/api/v1/requests",
        json.dumps(_ask("kv-read", reason="caf\xe9 \u2603 INC-1"), ensure_ascii=False).encode(),
        "application/json; charset=utf-8",
    )
    assert response.status_code == 201, response.json
    assert response.json["reason"] == "caf\xe9 \u2603 INC-1"
    approved = api.post("bob", f"/api/v1/requests/{api.pending}/approve", b"", None)
    assert approved.status_code == 200, approved.json


def test_a_challenge_quoting_a_token_can_be_sent(api):
    """The 401's WWW-Authenticate quotes why the token failed; a token's own fields (here its
    `alg`) must not put a line break or a non-Latin-1 character into that header."""
    token = _jwt({"alg": "\u0151\r\nX-Injected: 1", "typ": "at+jwt", "kid": "k"})
    response = api.client.post("/api/v1/requests", headers={"Authorization": f"Bearer {token}"})
    body = assert_json_error(response, 401)
    assert body["error"] == "unauthenticated"
    assert_sendable_headers(response)
    assert "X-Injected" not in response.headers
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="jit-broker", error=')


def _jwt(header: dict, claims: dict | None = None) -> str:
    def part(value) -> str:
        raw = json.dumps(value).encode("utf-8", "surrogatepass")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims or {})}.c2ln"


def _json(value) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: a lone surrogate goes as "\ud800"


# --- the fuzz -------------------------------------------------------------------------------------

# Text with everything in it: lone surrogates, NUL, other scripts' digits; and words the API knows.
_characters = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
_text = st.one_of(
    st.text(_characters, max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            LONE_SURROGATE,
            "\x00",
            "kv-read",
            "gated",
            "10m",
            "1h30m",
            "\u0665m",
            "\uff15\uff10",
            "INC-7",
            "justified",
            "unjustified",
            "9" * 40,
            "ssh-ed25519 AAAA",
        ]
    ),
)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)
_known_keys = st.sampled_from(
    [
        "entitlement",
        "duration",
        "reason",
        "ticket",
        "public_key",
        "break_glass",
        "outcome",
        "notes",
    ]
)


def _mostly(usual, *unusual):
    """`usual` three times in four, so that most examples get past the checks before the body."""
    return st.sampled_from((True, True, True, False)).flatmap(
        lambda is_usual: usual if is_usual else st.one_of(*unusual)
    )


_bodies = _mostly(
    # Objects of the API's own keys with any values: these get past the parser into the use cases.
    st.dictionaries(_known_keys, _json_values, max_size=6).map(
        lambda value: json.dumps(value).encode()
    ),
    _json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=3000).map(_nested),
    st.binary(max_size=64),
)
_header_values = st.text(
    st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"), max_size=40
)
# Issue 10 item 5's shapes on the user's real token (its kid, claims and signature kept): any
# JSON value as alg, typ or kid, an ES256 alg naming the provider's RSA key, crit, key sources.
# A dict: the test puts these fields into the real token's header.
_header_changes = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["RS256", "ES256", "PS256", "HS256", "none"]) | _json_values,
        "typ": _json_values,
        "kid": _json_values,
        "crit": _json_values,
        "jku": _text,
        "b64": _scalars,
    },
)
_authorizations = _mostly(
    st.none(),  # the user's real token
    _header_changes,  # as often as all the others below together
    st.one_of(
        _header_values,
        _header_values.map(lambda value: f"Bearer {value}"),
        st.fixed_dictionaries({"alg": _text, "typ": _text, "kid": _text}).map(
            lambda header: f"Bearer {_jwt(header)}"
        ),
    ),
)
_headers = st.dictionaries(
    st.sampled_from(
        ["Accept", "Accept-Charset", "Cookie", "Origin", "X-Forwarded-For", "X-Request-Id"]
    ),
    _header_values,
    max_size=3,
)
_content_types = _mostly(
    st.just("application/json"),
    st.sampled_from(
        [
            "application/json; charset=utf-16",
            "application/merge-patch+json",
            "text/plain",
            "multipart/form-data; boundary=x",
            None,
        ]
    ),
    _header_values,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    endpoint=st.sampled_from(("requests", *ENDPOINTS)),
    target=st.sampled_from(("active", "pending", "break_glass", "approved", "nonexistent")),
    user=st.sampled_from(("alice", "bob", "carol")),
    body=_bodies,
    content_type=_content_types,
    authorization=_authorizations,
    headers=_headers,
)
def test_fuzz_any_body_and_headers_on_every_post_endpoint(
    api, endpoint, target, user, body, content_type, authorization, headers
):
    """Never a 5xx; every error the API's JSON; a refusal records nothing. A valid request may
    change things (it is then not a refusal)."""
    if endpoint == "requests":
        path = "/api/v1/requests"
    else:
        grant = getattr(api, target, "d0e5-not-a-grant")
        path = f"/api/v1/requests/{grant}/{endpoint}"
    if isinstance(authorization, dict):
        authorization = f"Bearer {with_header(api.tokens(user), **authorization)}"
    if authorization is not None:
        headers = {**headers, "Authorization": authorization}
    before = api.footprint()
    response = api.post(user, path, body, content_type, headers)
    event(f"{endpoint}: {response.status_code}")  # --hypothesis-show-statistics: how deep it got
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert_sendable_headers(response)
    if response.status_code >= 400:
        assert_json_error(response)
        api.assert_nothing_recorded(before)


# --- real HTTP: what the server answers before Flask sees the request ----------------------------


def raw_http(broker, request: bytes, timeout: float = 15) -> tuple[int, dict, bytes]:
    """Send bytes as they are (no client library to refuse them); the status, headers, body."""
    address = urlsplit(broker.url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except ConnectionError:  # the server answered (and closed) before reading it all
            pass
        received = b""
        # Until the whole answer is in: the server may keep reading an unread body after it.
        while not _complete(received) and (chunk := sock.recv(65536)):
            received += chunk
    status, headers, body = _split(received)
    return status, headers, body


def _split(received: bytes) -> tuple[int, dict, bytes]:
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def _complete(received: bytes) -> bool:
    if b"\r\n\r\n" not in received:
        return False
    _, headers, body = _split(received)
    return "content-length" in headers and len(body) >= int(headers["content-length"])


def _get(path: str, *header_lines: str, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *header_lines]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_raw_json_error(status, headers, body, expected: int) -> dict:
    assert status == expected, body[:300]
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    parsed = json.loads(body)
    assert parsed["error"] and parsed["detail"], parsed
    return parsed


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(_get("/api/v1/requests", "X-Big: " + "a" * 70_000), 431, id="header-line"),
        pytest.param(
            _get("/api/v1/requests", *(f"X-H{n}: {n}" for n in range(120))),
            431,
            id="too-many-headers",
        ),
        pytest.param(_get("/api/v1/requests?q=" + "a" * 70_000), 414, id="request-line"),
        pytest.param(b"GET /api/v1/requests HTTP/1.1 extra\r\n\r\n", 400, id="bad-request-line"),
        pytest.param(b"GET /api/v1/requests HTTP/9z\r\n\r\n", 400, id="bad-version"),
    ],
)
def test_the_servers_own_refusals_are_json_under_api(broker, request_bytes, status):
    """http.server refuses these itself, before Flask: it used to answer with an HTML page."""
    assert_raw_json_error(*raw_http(broker, request_bytes), status)


def test_the_servers_own_refusals_stay_html_outside_the_api(broker):
    status, headers, body = raw_http(broker, _get("/", "X-Big: " + "a" * 70_000))
    assert status == 431
    assert headers["content-type"].startswith("text/html")


def test_a_body_over_the_limit_is_413_json(broker, tokens):
    """MAX_CONTENT_LENGTH, over real HTTP: the API's JSON error, nothing recorded."""
    before = _live_footprint(broker)
    status, headers, body = raw_http(
        broker,
        _get(
            "/api/v1/requests",
            f"Authorization: Bearer {tokens('alice')}",
            "Content-Type: application/json",
            method="POST",
            body=b'{"reason": "' + b"a" * 100_000 + b'"}',
        ),
    )
    assert_raw_json_error(status, headers, body, 413)
    assert _live_footprint(broker) == before


def _chunked(body: bytes, token: str) -> bytes:
    head = _get(
        "/api/v1/requests",
        f"Authorization: Bearer {token}",
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
        method="POST",
    )
    return head + body


def test_a_chunked_body_over_the_limit_is_413_not_cut_short(broker, tokens):
    """werkzeug stops reading a chunked body at MAX_CONTENT_LENGTH without saying so: a valid
    object padded past the limit was read as the object and issued."""
    padded = json.dumps(_ask("kv-read")).encode() + b" " * 70_000
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(padded), padded)
    before = _live_footprint(broker)
    assert_raw_json_error(*raw_http(broker, _chunked(chunked, tokens("alice"))), 413)
    assert _live_footprint(broker) == before


def test_a_broken_chunked_body_is_400_json(broker, tokens):
    before = _live_footprint(broker)
    broken = b"zz\r\n{}\r\n0\r\n\r\n"
    assert_raw_json_error(*raw_http(broker, _chunked(broken, tokens("alice"))), 400)
    assert _live_footprint(broker) == before


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_a_bad_content_length_is_400_json(broker, tokens, length):
    before = _live_footprint(broker)
    request = _get(
        "/api/v1/requests",
        f"Authorization: Bearer {tokens('alice')}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        method="POST",
    )
    assert_raw_json_error(*raw_http(broker, request), 400)
    assert _live_footprint(broker) == before


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/requests/%ff%fe",  # not UTF-8
        "/api/v1/requests/%ed%a0%80",  # a UTF-8-encoded surrogate
        "/api/v1/requests/%00",
        "/api/v1/requests/%zz",  # not a percent escape
        "/api/v1/requests/" + "%e2%98%83" * 2000,
        "/api/v1/requests?pending_approval=%ff%ed%a0%80&x=%zz&%00=%00",
        "/api/v1/requests?pending_approval=1&" + "a=b&" * 2000,
        "/api/v1/%ff",
    ],
)
def test_bad_encodings_in_paths_and_queries_are_4xx_json(broker, tokens, path):
    before = _live_footprint(broker)
    status, headers, body = raw_http(broker, _get(path, f"Authorization: Bearer {tokens('alice')}"))
    assert status < 500, body[:300]
    if status >= 400:
        assert_raw_json_error(status, headers, body, status)
    assert _live_footprint(broker) == before


@pytest.mark.parametrize(
    "value",
    ["Bearer \x00\x01\x7f", "Bearer \xff\xfe" * 100, "Bearer " + "a." * 4000, "\xe9"],
)
def test_any_authorization_bytes_are_401_json_over_http(broker, value):
    status, headers, body = raw_http(
        broker, _get("/api/v1/requests", f"Authorization: {value}", method="POST")
    )
    assert_raw_json_error(status, headers, body, 401)
    assert headers["www-authenticate"].startswith("Bearer")


def _live_footprint(broker):
    db = broker.grants.store.db
    return (
        db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"],
        broker.grants.store.audit_head(),
    )


# --- the token endpoint: any client assertion, any person token ----------------------------------

_AGENT_KEY = SigningKey("fuzz-agent-1", "ES256")
_ES256 = ECAlgorithm(ECAlgorithm.SHA256)


def _signed(header: dict, claims: dict) -> str:
    """Any header and claims, signed for real with the registered agent key (so that an assertion
    gets past the signature to the claim checks)."""

    def part(value) -> str:
        raw = json.dumps(value).encode("utf-8", "surrogatepass")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(claims)}"
    signature = _ES256.sign(signing_input.encode(), _AGENT_KEY.private)
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _claims(audience: str):
    def usual_or_any(usual):
        return _mostly(st.just(usual), _json_values)

    now = int(time.time())
    return st.fixed_dictionaries(
        {},
        optional={
            "iss": usual_or_any("fuzz-agent"),
            "sub": usual_or_any("fuzz-agent"),
            "aud": usual_or_any(audience),
            "exp": usual_or_any(now + 60),
            "iat": usual_or_any(now),
            "nbf": _json_values,
            "jti": _mostly(st.uuids().map(str), _json_values),
        },
    )


_assertion_headers = st.fixed_dictionaries(
    {
        "alg": _mostly(st.just("ES256"), st.sampled_from(["none", "HS256", "RS256"]), _json_values),
        "kid": _mostly(st.just(_AGENT_KEY.kid), _json_values),
    },
    optional={"crit": _json_values, "jku": _text, "typ": _json_values},
)


@pytest.fixture
def token_app(make_app):
    """A broker with one agent registered for private_key_jwt (inline key) and a task policy."""
    clients = {"fuzz-agent": {"jwks": {"keys": [_AGENT_KEY.jwk()]}}}
    return make_app(policy_text=TASK_TOOLS + TRIAGE_TASK, oauth={"clients": clients})


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), endpoint=st.sampled_from(["/oauth/token", "/oauth/revoke"]))
def test_fuzz_client_assertions_and_subject_tokens_never_5xx(token_app, tokens, data, endpoint):
    """private_key_jwt with any header and claims (signed with the agent's registered key, or
    not signed at all), any assertion type, any person token as the subject: an OAuth error as
    JSON, never a 5xx, and no token recorded nor audit entry written."""
    app = token_app
    audience = app.extensions["jit"].signer.issuer + "/oauth/token"
    assertion = data.draw(
        _mostly(
            st.tuples(_assertion_headers, _claims(audience)).map(lambda hc: _signed(*hc)),
            st.tuples(_assertion_headers, _claims(audience)).map(lambda hc: _jwt(*hc)),
            _text,
        ),
        "assertion",
    )
    form = {
        "grant_type": data.draw(_mostly(st.just(TOKEN_EXCHANGE), _text), "grant_type"),
        "client_assertion_type": data.draw(_mostly(st.just(JWT_BEARER), _text), "type"),
        "client_assertion": assertion,
        "subject_token": data.draw(
            _mostly(st.just(tokens("alice")), st.just(tokens("alice")[:-3]), _text), "subject"
        ),
        "subject_token_type": ACCESS_TOKEN,
        "resource": TASK_GITHUB,
        "token": data.draw(_text, "token"),
    }
    store = app.extensions["jit"].grants.store
    head = store.audit_head()
    response = app.test_client().post(endpoint, data=_encodable(form))
    event(f"{endpoint}: {response.status_code}")
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert_sendable_headers(response)
    if response.status_code >= 400:
        assert isinstance(response.json["error"], str), response.json
    assert store.db.execute("SELECT COUNT(*) AS n FROM access_tokens").fetchone()["n"] == 0
    assert store.audit_head() == head


def _encodable(form: dict) -> dict:
    """What a form can carry: text that encodes (a lone surrogate goes as its escape)."""
    return {k: v.encode("utf-8", "backslashreplace").decode() for k, v in form.items()}


@pytest.mark.parametrize("alg", ['a"b', "back\\slash", "\x00", "\u00e9", LONE_SURROGATE])
@pytest.mark.parametrize("where", ["actor_token", "subject_token", "client_assertion"])
def test_a_token_header_quoting_anything_is_an_oauth_error_not_a_500(
    token_app, tokens, oidc_provider, oidc_client_secret, alg, where
):
    """A refusal's text may quote the token (its alg); error_description allows no quote,
    backslash or non-ASCII (RFC 6749 §5.2), so they are replaced rather than crash authlib."""
    agent = client_credentials_token(oidc_provider, "ci-agent", agent_secret(oidc_client_secret))
    bad = _jwt({"alg": alg, "typ": "at+jwt", "kid": "k"})
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": tokens("alice"),
        "subject_token_type": ACCESS_TOKEN,
        "actor_token": agent,
        "actor_token_type": ACCESS_TOKEN,
        "resource": TASK_GITHUB,
    }
    if where == "client_assertion":
        del form["actor_token"], form["actor_token_type"]
        form.update(client_assertion_type=JWT_BEARER)
    form[where] = bad
    response = token_app.test_client().post("/oauth/token", data=_encodable(form))
    assert response.status_code in (400, 401), response.get_data(as_text=True)[:300]
    assert response.json["error"] in ("invalid_client", "invalid_grant"), response.json
    assert_sendable_headers(response)
