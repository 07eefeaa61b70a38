"""Browser sessions held by the broker, not by the cookie (issue 10, items 3, 4 and 7): the cookie
is an opaque id; the claims are confirmed with the real provider (refresh token grant) before
sensitive actions, so a person removed from a group at the provider cannot act on the groups of
their login; a refused refresh ends the session; logout ends it here and at the provider; the
authorization response's `iss` is checked (RFC 9207); http:// is for loopback only."""

import base64
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import jwt
import pytest
import requests

from broker.config import check_service_settings, load_settings
from broker.errors import ConfigError
from broker.web.sessions import Login
from scripts.launchers import OidcProvider, follow_login, free_port, provider_config
from tests.helpers import APPROVAL_POLICY, browser, csrf, login

OPAQUE_ID = re.compile(r"[A-Za-z0-9_-]{43}")


@pytest.fixture
def person(oidc_provider):
    """A person of this test only (so changing them disturbs no other test), removed after it.
    Returns a function: person(groups) -> username; person.change(username, groups or None)."""
    made = []

    def make(groups):
        name = f"p{secrets.token_hex(4)}"
        made.append(name)
        oidc_provider.set_account(name, account(name, groups))
        return name

    def change(name, groups):
        oidc_provider.set_account(name, None if groups is None else account(name, groups))

    make.change = change
    yield make
    for name in made:
        oidc_provider.set_account(name, None)


def account(name, groups):
    return {"email": f"{name}@example.com", "name": name.title(), "groups": groups}


def cookie_of(session):
    return session.cookies.get("session")


def sessions_in(app):
    """The session rows of a Flask app (or of the live broker's)."""
    app = getattr(app, "app", app)
    rows = app.extensions["jit"].grants.store.db.execute("SELECT * FROM web_sessions")
    return [dict(row) for row in rows]


def grant_count(app):
    store = app.extensions["jit"].grants.store
    return store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"]


def home_csrf(client):
    return csrf(client.get("/").get_data(as_text=True))


def ask_db_admin(client, token):
    return client.post(
        "/requests",
        data={
            "csrf_token": token,
            "entitlement": "db-admin",
            "duration": "10m",
            "reason": "INC-42 fix the index",
            "ticket": "INC-42",
        },
    )


def pending_id(app):
    rows = app.extensions["jit"].grants.store.db.execute(
        "SELECT id FROM grants WHERE status = 'pending' ORDER BY created_at DESC, rowid DESC"
    )
    return rows.fetchone()["id"]


# --- the cookie -----------------------------------------------------------------------------------


def test_the_cookie_is_only_an_opaque_id_and_changes_at_login(broker):
    anonymous = requests.Session()
    start = anonymous.get(broker.url + "/auth/login", allow_redirects=False, timeout=10)
    query = parse_qs(urlsplit(start.headers["Location"]).query)
    before = cookie_of(anonymous)
    # authlib's login state (state, nonce, PKCE verifier) is kept, but not in the cookie
    assert OPAQUE_ID.fullmatch(before), before
    assert query["state"][0] not in before and query["nonce"][0] not in before

    session, home = login(broker, "alice")
    assert "alice@example.com" in home.text
    value = cookie_of(session)
    assert OPAQUE_ID.fullmatch(value), value
    decoded = base64.urlsafe_b64decode(value + "=")
    assert b"alice" not in decoded and b"engineers" not in decoded
    assert value != cookie_of(anonymous)  # a new id at login: no session fixation

    # In the store: found by a hash of the id, the login sealed (no claims, no tokens in clear).
    rows = {row["key"]: row for row in sessions_in(broker)}
    assert value not in rows
    mine = [row for row in rows.values() if row["subject"] == "alice"]
    assert mine and all(b"alice@example.com" not in row["login"] for row in mine)


def test_a_login_keeps_its_tokens_out_of_reprs():
    login_ = Login({"sub": "x"}, 0.0, refresh_token="rt-s3cret", id_token="idt-s3cret")
    assert "s3cret" not in repr(login_)


@pytest.mark.parametrize(
    "value", ["", "x", "A" * 43, "A" * 4000, "../../etc", "\u00e9" * 43, "eyJhbGciOi.J9.x"]
)
def test_any_cookie_value_is_anonymous_not_an_error(broker, value):
    response = requests.get(
        broker.url + "/approvals",
        headers={"Cookie": f"session={value}"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302  # to the login page


# --- claims confirmed with the provider -----------------------------------------------------------


def test_an_approver_removed_from_the_group_at_the_provider_cannot_approve(
    make_app, api_for, person
):
    app = make_app(policy_text=APPROVAL_POLICY)
    assert api_for(app)("POST", "/api/v1/requests", _db_admin_body()).status_code == 201
    grant_id = pending_id(app)
    approver = person(["security"])
    client = browser(app, approver)
    assert grant_id in client.get("/approvals").get_data(as_text=True)
    token = home_csrf(client)

    person.change(approver, ["engineers"])  # no longer in security
    response = client.post(f"/requests/{grant_id}/approve", data={"csrf_token": token})
    assert response.status_code == 403, response.get_data(as_text=True)
    # not_an_approver, said on the current groups
    assert "come from members of security; you are in engineers" in response.get_data(as_text=True)
    grant = app.extensions["jit"].grants.store.get_grant(grant_id)
    assert grant.status == "pending"
    assert app.extensions["jit"].grants.store.approvals_of(grant_id) == []


def test_a_requester_removed_from_the_group_at_the_provider_cannot_activate(
    make_app, api_for, person, openbao
):
    app = make_app(policy_text=APPROVAL_POLICY)
    requester = person(["engineers"])
    client = browser(app, requester)
    token = home_csrf(client)
    assert ask_db_admin(client, token).status_code == 303  # to the request's page
    grant_id = pending_id(app)
    approved = api_for(app)("POST", f"/api/v1/requests/{grant_id}/approve", user="bob")
    assert approved.status_code == 200, approved.json

    person.change(requester, ["contractors"])  # no longer an engineer
    response = client.post(f"/requests/{grant_id}/activate", data={"csrf_token": token})
    assert response.status_code == 403, response.get_data(as_text=True)
    assert f"members of engineers; {requester}@example.com is in contractors" in response.get_data(
        as_text=True
    )
    grant = app.extensions["jit"].grants.store.get_grant(grant_id)
    assert grant.status == "denied" and not grant.handle  # never issued; closed as ineligible


def _db_admin_body():
    return {"entitlement": "db-admin", "reason": "INC-7 reindex", "ticket": "INC-7"}


def test_claims_are_refreshed_after_session_refresh_seconds(make_app, person):
    app = make_app(server={"session_refresh": 1})
    name = person(["engineers"])
    client = browser(app, name)
    assert "kv-read" in client.get("/").get_data(as_text=True)
    person.change(name, ["security"])
    assert "kv-admin" not in client.get("/").get_data(as_text=True)  # not yet: < 1 s old
    time.sleep(1.1)
    page = client.get("/").get_data(as_text=True)
    assert "kv-admin" in page and 'value="kv-read"' not in page


def test_a_refresh_the_provider_refuses_ends_the_session(make_app, person):
    app = make_app(policy_text=APPROVAL_POLICY)
    name = person(["engineers"])
    client = browser(app, name)
    token = home_csrf(client)
    person.change(name, None)  # the account is gone

    response = ask_db_admin(client, token)
    assert response.status_code == 303 and urlsplit(response.headers["Location"]).path == "/"
    page = client.get("/").get_data(as_text=True)
    assert "Your session has ended. Log in again." in page
    assert "Log in" in page and name not in page
    assert not [row for row in sessions_in(app) if row["subject"] == name]
    assert grant_count(app) == 0


def test_pages_end_a_refused_session_too(make_app, person):
    app = make_app(server={"session_refresh": 1})
    name = person(["engineers"])
    client = browser(app, name)
    person.change(name, None)
    time.sleep(1.1)
    response = client.get("/approvals")
    assert response.status_code == 302
    assert "Your session has ended" in client.get("/").get_data(as_text=True)


def test_many_actions_at_once_in_one_session_refresh_one_at_a_time(broker):
    """The provider rotates refresh tokens and revokes everything when a spent one comes back:
    parallel confirmations in one session must each use the token the previous one left."""
    session, home = login(broker, "alice")
    token, cookie = csrf(home.text), cookie_of(session)

    def deny_unknown(_):
        return requests.post(
            broker.url + "/requests/no-such-grant/deny",
            data={"csrf_token": token, "reason": "x"},
            cookies={"session": cookie},
            allow_redirects=False,
            timeout=30,
        ).status_code

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(deny_unknown, range(16)))
    assert answers == [404] * 16
    assert "alice@example.com" in session.get(broker.url + "/", timeout=10).text


def test_an_unreachable_provider_refuses_sensitive_actions_with_503(
    make_app, tmp_path, broker_port, oidc_client_secret, person
):
    own = OidcProvider.start(
        provider_config(
            free_port(), f"http://127.0.0.1:{broker_port}/auth/callback", oidc_client_secret
        ),
        tmp_path / "idp",
    )
    try:
        app = make_app(policy_text=APPROVAL_POLICY, oidc={"issuer": own.issuer})
        client = browser(app, "alice")
        token = home_csrf(client)
    finally:
        own.stop()
    response = ask_db_admin(client, token)
    assert response.status_code == 503, response.get_data(as_text=True)
    assert "provider cannot be reached to confirm the login" in response.get_data(as_text=True)
    assert grant_count(app) == 0
    assert "alice@example.com" in client.get("/").get_data(as_text=True)  # still signed in


# --- expiry ---------------------------------------------------------------------------------------


def test_an_idle_session_ends(make_app):
    app = make_app(server={"session_idle": 1})
    client = browser(app, "alice")
    assert "alice@example.com" in client.get("/").get_data(as_text=True)
    time.sleep(1.1)
    assert "alice@example.com" not in client.get("/").get_data(as_text=True)
    assert sessions_in(app) == []  # the expired row went with it


def test_every_session_ends_after_its_lifetime_and_expired_rows_are_purged(make_app):
    app = make_app(server={"session_lifetime": 1})
    client = browser(app, "alice")
    assert len(sessions_in(app)) == 1
    time.sleep(1.1)
    app.session_interface.purge_every = 0
    browser(app, "bob")  # a new session purges the expired ones
    assert [row["subject"] for row in sessions_in(app)] == ["bob"]
    assert "alice@example.com" not in client.get("/").get_data(as_text=True)


# --- logout ---------------------------------------------------------------------------------------


def test_logout_ends_the_session_here_and_at_the_provider(broker, oidc_provider):
    session, home = login(broker, "alice")
    captured = cookie_of(session)
    response = session.post(
        broker.url + "/auth/logout",
        data={"csrf_token": csrf(home.text)},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 303
    target = urlsplit(response.headers["Location"])
    end_session = oidc_provider.metadata["end_session_endpoint"]
    assert urlunsplit((*target[:3], "", "")) == end_session
    query = {name: values[0] for name, values in parse_qs(target.query).items()}
    assert query["post_logout_redirect_uri"] == broker.url + "/"
    assert query["client_id"] == "jit-broker"
    hint = jwt.decode(query["id_token_hint"], options={"verify_signature": False})
    assert hint["sub"] == "alice" and hint["aud"] == "jit-broker"
    assert hint["iss"] == oidc_provider.issuer

    # The captured cookie is worth nothing now.
    replay = requests.get(broker.url + "/", cookies={"session": captured}, timeout=10)
    assert "Log in" in replay.text and "alice@example.com" not in replay.text
    forged = requests.post(
        broker.url + "/requests",
        data={"csrf_token": csrf(home.text), "entitlement": "kv-read", "reason": "replay"},
        cookies={"session": captured},
        allow_redirects=False,
        timeout=10,
    )
    assert forged.status_code in (302, 400)  # no session, so no CSRF token either
    assert not [row for row in sessions_in(broker) if row["key"] == captured]

    # The provider accepts the request (hint, registered redirect) and sends the browser back.
    confirm = session.get(response.headers["Location"], timeout=10)
    assert confirm.status_code == 200, confirm.text
    back = follow_login(session, confirm, "alice", stop_at_redirect_uri=True)
    assert back.startswith(broker.url + "/")


# --- the authorization response's issuer (RFC 9207) -----------------------------------------------


def _callback_url(broker, session):
    start = session.get(broker.url + "/auth/login", allow_redirects=False, timeout=10)
    return follow_login(session, start, "alice", stop_at_redirect_uri=True)


def _with_iss(url, iss):
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    query.pop("iss", None)
    if iss is not None:
        query["iss"] = iss
    return urlunsplit((*parts[:3], urlencode(query), ""))


@pytest.mark.parametrize("iss", ["https://evil.example", None])
def test_a_callback_naming_another_issuer_or_none_is_refused(broker, oidc_provider, iss):
    session = requests.Session()
    genuine = _callback_url(broker, session)
    assert parse_qs(urlsplit(genuine).query)["iss"] == [oidc_provider.issuer]
    response = session.get(_with_iss(genuine, iss), allow_redirects=False, timeout=10)
    assert response.status_code == 400
    assert "login failed" in response.text and "issuer" in response.text
    assert "alice@example.com" not in session.get(broker.url + "/", timeout=10).text


# --- http:// only on loopback ---------------------------------------------------------------------


def _settings(issuer="https://idp.example", base_url="https://broker.example"):
    return load_settings(
        overrides={
            "server": {"base_url": base_url},
            "oidc": {"issuer": issuer, "client_id": "c", "api_audience": "a"},
            "vault": {"token": "t"},
        },
        environ={},
    )


@pytest.mark.parametrize(
    ("issuer", "base_url", "name"),
    [
        ("http://idp.example", "https://broker.example", "oidc.issuer"),
        ("https://idp.example", "http://broker.example", "server.base_url"),
        ("http://10.0.0.5:8080", "https://broker.example", "oidc.issuer"),
        ("https://idp.example", "http://127.0.0.1.nip.io", "server.base_url"),
        ("https://idp.example", "ftp://broker.example", "server.base_url"),
    ],
)
def test_http_outside_loopback_is_refused(issuer, base_url, name):
    with pytest.raises(ConfigError, match="https") as refused:
        check_service_settings(_settings(issuer, base_url))
    assert name in str(refused.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:5000", "http://127.8.9.10", "http://[::1]:8080", "http://localhost"]
)
def test_http_on_loopback_is_accepted(url):
    check_service_settings(_settings(url, url))
    check_service_settings(_settings())


@pytest.mark.parametrize("value", [0, -5, True, "300"])
def test_session_timings_must_be_positive_seconds(value):
    settings = _settings()
    settings.server["session_refresh"] = value
    with pytest.raises(ConfigError, match="session_refresh"):
        check_service_settings(settings)
