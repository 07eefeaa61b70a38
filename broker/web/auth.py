"""Browser login through the organisation's OIDC provider: authorization code flow with PKCE S256,
state and nonce (authlib), exact redirect URI from the config, the `iss` of the authorization
response checked (RFC 9207).

The session (broker/web/sessions.py, server-side) keeps the login's claims and the provider's
refresh token. What a person may do is decided on their current claims: the claims are refreshed
with the refresh token (the new ID token carries the provider's current groups) once they are
older than `[server] session_refresh`, and always before a sensitive action (`fresh_principal`).
A provider that refuses the refresh (the person or their grant is gone) ends the session; one that
cannot be reached refuses sensitive actions with a 503 rather than acting on old claims."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import NoReturn
from urllib.parse import urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import FlaskOAuth2App, OAuth, OAuthError
from flask import Blueprint, Flask, current_app, flash, g, redirect, request, session, url_for
from werkzeug.wrappers import Response

from ..errors import ConfigError, InvalidRequest, ProviderUnavailable
from ..identity import principal_from_claims
from ..models import Principal
from . import services
from .sessions import Login, ServerSession, StoreSessionInterface

log = logging.getLogger(__name__)

bp = Blueprint("auth", __name__, url_prefix="/auth")

SESSION_ENDED = "Your session has ended. Log in again."
# OAuth errors that mean "try again later", not "this refresh token is no good".
PROVIDER_BUSY = {"server_error", "temporarily_unavailable"}


class SessionEnded(Exception):
    """The provider would not confirm who this session belongs to: it is over (ended already)."""


def init_app(app: Flask) -> None:
    jit = app.extensions["jit"]
    oidc, server = jit.settings.oidc, jit.settings.server
    if app.secret_key is None:  # create_app always sets one
        raise ConfigError("the app has no secret key to seal its sessions with")
    app.session_interface = StoreSessionInterface(
        jit.grants.store, app.secret_key, server["session_idle"], server["session_lifetime"]
    )
    oauth = OAuth(app)
    oauth.register(
        "oidc",
        client_id=oidc["client_id"],
        client_secret=oidc["client_secret"],
        server_metadata_url=jit.metadata.url,
        client_kwargs={
            "scope": oidc["scopes"],
            "code_challenge_method": "S256",
            "token_endpoint_auth_method": "client_secret_basic",
            "default_timeout": 10,
        },
    )
    app.register_error_handler(SessionEnded, _session_ended)
    # First of all hooks (before the CSRF check, which reads the session): a session the store
    # could not open is a 503, not a missing CSRF token or an anonymous page.
    app.before_request_funcs.setdefault(None, []).insert(
        0, app.session_interface.raise_if_unavailable
    )


def _client() -> FlaskOAuth2App:
    return current_app.extensions["authlib.integrations.flask_client"].oidc


def _sessions() -> StoreSessionInterface:
    interface = current_app.session_interface
    if not isinstance(interface, StoreSessionInterface):
        raise TypeError("init_app did not install the store's sessions")
    return interface


def _session() -> ServerSession:
    """This request's session: a ServerSession, as `_sessions()` always opens one."""
    if not isinstance(session, ServerSession):
        raise TypeError("the request's session is not the store's")
    return session


# --- who is signed in ----------------------------------------------------------------------------


def current_principal() -> Principal | None:
    """The signed-in person, on claims at most `session_refresh` seconds old. If the provider
    cannot be reached, pages go on with the last claims (sensitive actions do not: see
    `fresh_principal`). A refused refresh ends the session: None, with a message to log in."""
    if "jit_principal" in g:
        return g.jit_principal
    login = getattr(session, "login", None)
    # Until the refresh below says otherwise, and for the error page if it raises (the store
    # full: a 503), which must not try the refresh a second time.
    g.jit_principal = Principal.from_claims(login.claims) if login else None
    if login is not None and time.time() - login.checked_at >= _refresh_every():
        try:
            login = _refresh(since=login.checked_at)
        except SessionEnded:
            login = None
        except ProviderUnavailable as exc:
            log.warning("session claims not refreshed, the provider is unreachable: %s", exc)
    g.jit_principal = Principal.from_claims(login.claims) if login else None
    return g.jit_principal


def fresh_principal() -> Principal:
    """The signed-in person on claims the provider confirmed during this request: for approve,
    activate, extend, break-glass and the other actions that must not rest on old claims.
    Raises SessionEnded (not signed in, or refused) or ProviderUnavailable (a 503)."""
    if g.get("jit_principal_fresh"):
        return g.jit_principal
    if getattr(session, "login", None) is None:
        raise SessionEnded("not signed in")
    login = _refresh(since=time.time())
    g.jit_principal, g.jit_principal_fresh = Principal.from_claims(login.claims), True
    return g.jit_principal


def _refresh_every() -> int:
    return services().settings.server["session_refresh"]


# One lock per session id: a refresh token may be rotated by each use, and the provider treats a
# second use of a rotated one as theft (it revokes the whole grant). So the refreshes of one
# session run one at a time, each with the token the previous one left.
_locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
_locks_guard = threading.Lock()


def _lock_for(sid: str) -> threading.Lock:
    with _locks_guard:
        lock = _locks.get(sid)
        if lock is None:
            lock = _locks[sid] = threading.Lock()
        return lock


def _refresh(since: float) -> Login:
    """The session's login, confirmed by the provider after `since` (epoch seconds): by this
    request, or by another one of the same session that refreshed while this one waited."""
    current = _session()
    lock = _lock_for(current.sid)
    with lock:
        login = _sessions().load_login(current)
        if login is None:  # ended meanwhile (logout in another tab, expiry)
            _end_session()
        if login.checked_at > since:
            current.login = login
            return login
        login = _confirmed_by_provider(login)
        if not _sessions().save_login(current, login):
            _end_session()
        return login


def _confirmed_by_provider(login: Login) -> Login:
    """Use the refresh token; the new ID token's claims replace the session's."""
    client = _client()
    try:
        token = client.fetch_access_token(
            grant_type="refresh_token", refresh_token=login.refresh_token
        )
    except OAuthError as exc:
        if exc.error in PROVIDER_BUSY:
            raise ProviderUnavailable(
                f"the OIDC provider cannot refresh the login: {exc.error}"
            ) from None
        log.info("session of %s ended: the provider refused the refresh (%s)",
                 login.claims.get("sub"), exc.error)  # fmt: skip
        _end_session()
    except (requests.RequestException, ValueError) as exc:
        raise ProviderUnavailable(
            f"the OIDC provider cannot be reached to confirm the login: {type(exc).__name__}"
        ) from None
    try:
        claims = dict(client.parse_id_token(token, nonce=None, claims_options=_claims_options()))
    except (AuthlibBaseError, ValueError, TypeError, KeyError) as exc:
        log.warning("session of %s ended: the refreshed ID token is not valid (%s)",
                    login.claims.get("sub"), type(exc).__name__)  # fmt: skip
        _end_session()
    if claims.get("sub") != login.claims["sub"]:  # OIDC Core §12.2: the same person
        log.warning("session ended: the refreshed ID token names another subject")
        _end_session()
    principal = _principal_from(claims)
    return Login(
        claims=principal.claims(),
        checked_at=time.time(),
        # The provider may rotate the refresh token: the old one is spent from now on.
        refresh_token=token.get("refresh_token") or login.refresh_token,
        id_token=token["id_token"],
    )


def _claims_options() -> dict:
    return {"iss": {"essential": True, "value": services().settings.oidc["issuer"]}}


def _principal_from(claims: dict) -> Principal:
    return principal_from_claims(claims, services().settings.oidc["groups_claim"])


def _end_session() -> NoReturn:
    """End this session now and say so on the next page; raises SessionEnded."""
    _sessions().end(_session())
    g.jit_principal = None
    flash(SESSION_ENDED)
    raise SessionEnded(SESSION_ENDED)


def _session_ended(_exc: SessionEnded) -> Response:
    """An action on a session that has ended: back to the login page (which says why)."""
    return redirect(url_for("ui.index"), 303)


# --- login and logout ----------------------------------------------------------------------------


def safe_next(target: str | None) -> str | None:
    """`target` when it is a path of this site (`/audit?x=1`), else None: never another origin
    (`//evil`, `https://evil`, `/\\evil`), so a login link cannot send anyone away."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    return target


NEXT = "login_next"  # the session key of the page to land on after login


@bp.get("/login")
def login() -> Response:
    services().metadata.get()  # the provider's issuer is checked before we send anyone there
    wanted = safe_next(request.args.get("next"))
    if wanted:
        session[NEXT] = wanted  # only a path of this site: never an open redirect
    return _client().authorize_redirect(services().settings.redirect_uri)


@bp.get("/callback")
def callback() -> Response:
    settings = services().settings
    _check_response_issuer(settings.oidc["issuer"])
    try:
        token = _client().authorize_access_token(claims_options=_claims_options())
    except OAuthError as exc:
        raise InvalidRequest(f"login failed: {exc.description or exc.error}") from None
    if not token.get("userinfo"):
        raise InvalidRequest("login failed: the provider returned no ID token")
    principal = _principal_from(dict(token["userinfo"]))
    if not token.get("refresh_token"):
        # Without it the claims could never be confirmed again: refuse rather than trust them
        # for the whole session.
        raise InvalidRequest("login failed: the provider returned no refresh token")
    login = Login(
        claims=principal.claims(),
        checked_at=time.time(),
        refresh_token=token["refresh_token"],
        id_token=token["id_token"],
    )
    wanted = safe_next(session.pop(NEXT, None))
    _sessions().start_login(_session(), login)  # a new session id: nothing carried over
    return redirect(wanted or url_for("ui.index"))


def _check_response_issuer(issuer: str) -> None:
    """RFC 9207: an authorization response must come from the provider we sent the browser to
    (mix-up attacks). Required when the provider says it sends `iss`."""
    sent = request.args.get("iss")
    if sent is None:
        metadata = services().metadata.get()
        if metadata.get("authorization_response_iss_parameter_supported"):
            raise InvalidRequest("login failed: the authorization response has no issuer (iss)")
    elif sent != issuer:
        raise InvalidRequest("login failed: the authorization response names another issuer")


@bp.post("/logout")
def logout() -> Response:
    """End the session here (a replayed cookie is anonymous from now on), then at the provider
    (RP-initiated logout) when it offers an end-session endpoint."""
    login = getattr(session, "login", None)
    _sessions().end(_session())
    g.jit_principal = None
    metadata = services().metadata
    end_session = None
    if login is not None:
        try:
            end_session = metadata.get().get("end_session_endpoint")
        except ProviderUnavailable:
            end_session = None  # logged out here all the same
    if login is None or not end_session:  # no login: end_session stayed None
        return redirect(url_for("ui.index"), 303)
    settings = services().settings
    target = _client().create_logout_url(
        post_logout_redirect_uri=settings.post_logout_redirect_uri,
        id_token_hint=login.id_token,
        client_id=settings.oidc["client_id"],
    )
    return redirect(target["url"], 303)
