"""Server-side browser sessions (a Flask SessionInterface over the broker's store).

The cookie carries only a random id, so nothing the session holds can be read or replayed from
it: not authlib's login state (PKCE verifier, state, nonce), not the CSRF token, not the claims.
Keeping the row in the store lets logout end a session for good (a captured cookie is worth
nothing afterwards) and lets several replicas share sessions. Rows are looked up by the SHA-256
of the id and sealed (AES-GCM, key derived from the app's secret key), so a copy of the
database alone neither names a live cookie nor holds a usable refresh token.

Two parts of a row are written separately, so that one cannot overwrite the other:
- `data`: the Flask session dict, written at the end of a request that changed it;
- `login`: who is signed in (claims, refresh token, ID token) and when the provider last
  confirmed it, written at once by broker/web/auth.py (login, refresh) under its lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Flask, Request, Response, request
from flask import session as flask_session
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

from ..errors import StoreUnavailable
from ..store import Store

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
TOUCH_EVERY = 60  # seconds: how stale `last_seen` may get, so not every request writes
PURGE_EVERY = 60  # seconds between deletions of expired rows (done when a session starts)


@dataclass
class Login:
    """Who a session belongs to, as the provider last confirmed (`checked_at`, epoch seconds).
    The tokens are secrets: never in a repr, a log line or a page."""

    claims: dict
    checked_at: float
    refresh_token: str = field(default="", repr=False)
    id_token: str = field(default="", repr=False)


class ServerSession(CallbackDict, SessionMixin):
    """The Flask session of one request; `login` is loaded with it but saved separately."""

    def __init__(
        self,
        data: Mapping[str, object] | None = None,
        sid: str = "",
        created_at: float = 0,
        login: Login | None = None,
        seen: float = 0.0,
    ) -> None:
        def changed(_: object) -> None:
            self.modified = True

        super().__init__(data, changed)
        self.sid = sid  # the cookie's value; "" until the session is first stored
        self.created_at = created_at
        self.last_seen = seen
        self.login: Login | None = login
        self.ended: list[str] = []  # ids to delete at the end of the request
        self.issued = False  # its id was made in this request: the response sets the cookie
        self.modified = False
        # Why the store could not be used for it: then it is neither read nor written again in
        # this request, and the request is refused with this error (a 503).
        self.unavailable: StoreUnavailable | None = None

    def end(self) -> None:
        """Forget everything and stop using this id (logout, login, a refused refresh): its row
        is deleted; anything written later goes to a new session with a new id."""
        if self.sid:
            self.ended.append(self.sid)
        self.sid, self.created_at, self.login, self.issued = "", 0, None, False
        self.clear()
        self.modified = False


class Sealer:
    """AES-GCM under a key derived from the app's secret key. The row's key is the associated
    data, so a sealed value pasted into another row does not open."""

    def __init__(self, secret: bytes | str):
        secret = secret.encode() if isinstance(secret, str) else secret
        key = HKDF(hashes.SHA256(), 32, salt=None, info=b"jit-broker web sessions").derive(secret)
        self._aead = AESGCM(key)

    def seal(self, value: dict, context: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, json.dumps(value).encode(), context.encode())

    def open(self, blob: bytes | None, context: str) -> dict | None:
        """The value, or None when there is none or it does not open (another secret key)."""
        if not blob or len(blob) < 13:
            return None
        try:
            return json.loads(self._aead.decrypt(blob[:12], blob[12:], context.encode()))
        except (InvalidTag, ValueError):
            return None


def row_key(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


class StoreSessionInterface(SessionInterface):
    """Flask's hook for sessions: load the row named by the cookie, save it after the request.
    Sessions end `idle` seconds after their last use and `lifetime` seconds after they began."""

    def __init__(self, store: Store, secret: bytes | str, idle: int, lifetime: int):
        self.store = store
        self.sealer = Sealer(secret)
        self.idle = idle
        self.lifetime = lifetime
        self.purge_every = PURGE_EVERY
        self._purged_at = 0.0

    # --- Flask's interface ---------------------------------------------------------------------

    def open_session(self, app: Flask, request: Request) -> ServerSession:
        """Flask opens the session before any view or error handler runs, where an exception is
        only a bare 500: a store that cannot be read gives an empty session that remembers why,
        and `raise_if_unavailable` (a before_request hook) refuses the request with it."""
        try:
            return self._open(app, request)
        except StoreUnavailable as exc:
            session = ServerSession()
            session.unavailable = exc
            return session

    def _open(self, app: Flask, request: Request) -> ServerSession:
        sid = request.cookies.get(self.get_cookie_name(app), "")
        if not SESSION_ID.fullmatch(sid):
            return ServerSession()  # no cookie, or one we never made: anonymous
        key = row_key(sid)
        row = self.store.web_session(key)
        now = time.time()
        if row is None:
            return ServerSession()
        if row["expires_at"] <= now:
            self.store.delete_web_session(key)
            return ServerSession()
        return ServerSession(
            self.sealer.open(row["data"], key) or {},
            sid=sid,
            created_at=row["created_at"],
            login=self._login(row, key),
            seen=row["last_seen"],
        )

    # Flask hands back the session open_session made (always a ServerSession here), but its
    # SessionInterface is not generic in the session type, so it declares SessionMixin.
    def save_session(  # type: ignore[override]
        self, app: Flask, session: ServerSession, response: Response
    ) -> None:
        if session.unavailable is not None:
            return  # refused already: nothing of it is written
        try:
            self._save(app, session, response)
        except StoreUnavailable as exc:
            # Raised after the view, so Flask answers it through its 500 handler, which
            # web/__init__.py answers as this error; Flask then saves again: not this session.
            session.unavailable = exc
            raise

    def _save(self, app: Flask, session: ServerSession, response: Response) -> None:
        for sid in session.ended:
            self.store.delete_web_session(row_key(sid))
        name = self.get_cookie_name(app)
        if not session.sid:
            if session.modified and session:
                self._insert(session)
            elif session.ended or name in request.cookies:
                response.delete_cookie(
                    name, domain=self.get_cookie_domain(app), path=self.get_cookie_path(app)
                )
        elif not session.issued:
            now = time.time()
            changes: dict = {}
            if session.modified:
                changes["data"] = self.sealer.seal(dict(session), row_key(session.sid))
            if changes or now - session.last_seen >= TOUCH_EVERY:
                changes.update(last_seen=now, expires_at=self._expires(session.created_at, now))
                # An UPDATE, never an insert: a session ended meanwhile (logout) stays ended.
                self.store.update_web_session(row_key(session.sid), **changes)
        elif session.modified:  # written when its id was issued, and changed again since
            self.store.update_web_session(
                row_key(session.sid), data=self.sealer.seal(dict(session), row_key(session.sid))
            )
        if session.issued:
            self._set_cookie(app, session, response)

    # --- for broker/web/auth.py ---------------------------------------------------------------

    @staticmethod
    def raise_if_unavailable() -> None:
        """A before_request hook: refuse a request whose session the store could not open."""
        unavailable = getattr(flask_session, "unavailable", None)
        if unavailable is not None:
            raise unavailable

    def start_login(self, session: ServerSession, login: Login) -> None:
        """A new id for the signed-in session (no fixation: the id used before login is dropped)
        and the row written now, so the browser's next request already finds it."""
        data = dict(session)
        session.end()
        session.update(data)
        session.login = login
        self._insert(session)
        session.modified = False

    def load_login(self, session: ServerSession) -> Login | None:
        """The login as stored now (another request may have refreshed it, or ended it)."""
        if not session.sid:
            return None
        key = row_key(session.sid)
        row = self.store.web_session(key)
        return self._login(row, key) if row and row["expires_at"] > time.time() else None

    def save_login(self, session: ServerSession, login: Login) -> bool:
        """Write the refreshed login now; False if the session was ended meanwhile."""
        session.login = login
        key = row_key(session.sid)
        return self.store.update_web_session(key, **self._login_columns(login, key))

    def end(self, session: ServerSession) -> None:
        """End the session now, not at the end of the request."""
        if session.sid:
            self.store.delete_web_session(row_key(session.sid))
        session.end()

    # --- helpers ---------------------------------------------------------------------------------

    def _insert(self, session: ServerSession) -> None:
        now = time.time()
        if now - self._purged_at >= self.purge_every:
            self.store.purge_web_sessions(now)
            self._purged_at = now
        session.sid = secrets.token_urlsafe(32)
        session.created_at = session.last_seen = now
        key = row_key(session.sid)
        columns = {"data": self.sealer.seal(dict(session), key)}
        if session.login is not None:
            columns.update(self._login_columns(session.login, key))
        self.store.insert_web_session(
            key, created_at=now, last_seen=now, expires_at=self._expires(now, now), **columns
        )
        session.issued = True

    def _set_cookie(self, app: Flask, session: ServerSession, response: Response) -> None:
        response.set_cookie(
            self.get_cookie_name(app),
            session.sid,
            expires=session.created_at + self.lifetime,
            httponly=self.get_cookie_httponly(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
        )

    def _expires(self, created_at: float, now: float) -> float:
        return min(created_at + self.lifetime, now + self.idle)

    def _login(self, row: dict, key: str) -> Login | None:
        value = self.sealer.open(row["login"], key)
        try:
            return Login(**value) if value else None
        except TypeError:  # written by a broker whose Login had other fields: sign in again
            return None

    def _login_columns(self, login: Login, key: str) -> dict:
        claims = login.claims
        return {
            "issuer": claims["iss"],
            "subject": claims["sub"],
            "checked_at": login.checked_at,
            "login": self.sealer.seal(asdict(login), key),
        }
