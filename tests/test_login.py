"""The browser path over real HTTP: the broker's login redirect, the provider's own login form, the
callback, the request form with its CSRF token, the credential shown once, release."""

import re
from urllib.parse import parse_qs, urlsplit

import requests

from tests.helpers import csrf, login, token_works, wait_for_status

GRANT_ID = re.compile(r'action="/requests/([^/"]+)/release"')
SECRET = re.compile(r'<p class="secret" id="credential">([^<]+)</p>')


def test_login_redirect_carries_pkce_state_nonce_and_the_exact_redirect_uri(broker, oidc_provider):
    response = requests.get(broker.url + "/auth/login", allow_redirects=False, timeout=10)
    assert response.status_code == 302
    target = urlsplit(response.headers["Location"])
    assert f"{target.scheme}://{target.netloc}".rstrip("/") == oidc_provider.issuer.rstrip("/")
    query = {name: values[0] for name, values in parse_qs(target.query).items()}
    assert query["response_type"] == "code"
    assert query["client_id"] == "jit-broker"
    assert query["redirect_uri"] == broker.url + "/auth/callback"
    assert query["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", query["code_challenge"])
    assert len(query["state"]) >= 20 and len(query["nonce"]) >= 20
    assert set(query["scope"].split()) >= {"openid", "groups"}


def test_login_request_use_and_release_through_the_browser(broker, openbao):
    session, home = login(broker, "alice")
    assert home.status_code == 200
    assert home.url.rstrip("/") == broker.url
    assert "alice@example.com" in home.text and "kv-read" in home.text
    assert "kv-admin" not in home.text  # alice is not in security

    issued = session.post(
        broker.url + "/requests",
        data={
            "csrf_token": csrf(home.text),
            "entitlement": "kv-read",
            "duration": "10m",
            "reason": "INC-7 from the browser",
        },
        timeout=15,
    )
    assert issued.status_code == 200, issued.text
    assert issued.headers["Cache-Control"] == "no-store"
    secret = SECRET.search(issued.text).group(1)
    assert token_works(openbao, secret)
    grant = broker.grants.store.get_grant(GRANT_ID.search(issued.text).group(1))
    assert grant.status == "active" and grant.reason == "INC-7 from the browser"

    home = session.get(broker.url + "/", timeout=10)
    assert secret not in home.text  # shown once
    assert grant.id in home.text

    released = session.post(
        broker.url + f"/requests/{grant.id}/release",
        data={"csrf_token": csrf(home.text)},
        timeout=10,
    )
    assert released.status_code == 200
    wait_for_status(broker.grants, grant.id, "revoked")
    assert not token_works(openbao, secret)
    detail = session.get(broker.url + f"/requests/{grant.id}", timeout=10)
    assert "revoked" in detail.text and "verify" in detail.text


def test_a_form_without_its_csrf_token_is_refused(broker):
    session, home = login(broker, "alice")
    count = broker.grants.store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"]
    response = session.post(
        broker.url + "/requests",
        data={"entitlement": "kv-read", "duration": "10m", "reason": "forged"},
        timeout=10,
    )
    assert response.status_code == 400
    assert "CSRF" in response.text
    assert (
        broker.grants.store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"] == count
    )


def test_a_refused_form_says_why_and_issues_nothing(broker):
    session, home = login(broker, "alice")
    count = broker.grants.store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"]
    response = session.post(
        broker.url + "/requests",
        data={
            "csrf_token": csrf(home.text),
            "entitlement": "kv-read",
            "duration": "3h",
            "reason": "too long",
        },
        timeout=10,
    )
    assert response.status_code == 422
    assert "longer than the maximum 1h" in response.text
    assert (
        broker.grants.store.db.execute("SELECT count(*) AS n FROM grants").fetchone()["n"] == count
    )


def test_someone_eligible_for_nothing_is_told_so(broker):
    _, home = login(broker, "carol")
    assert "not eligible for any entitlement" in home.text
    assert "contractors" in home.text


def test_a_callback_with_a_forged_state_is_refused(broker):
    session = requests.Session()
    session.get(broker.url + "/auth/login", allow_redirects=False, timeout=10)
    response = session.get(broker.url + "/auth/callback?code=stolen&state=forged", timeout=10)
    assert response.status_code == 400
    assert "login failed" in response.text
    assert "alice" not in session.get(broker.url + "/", timeout=10).text


def test_logout_ends_the_session(broker):
    session, home = login(broker, "alice")
    session.post(broker.url + "/auth/logout", data={"csrf_token": csrf(home.text)}, timeout=10)
    page = session.get(broker.url + "/", timeout=10)
    assert "Log in" in page.text and "alice@example.com" not in page.text
