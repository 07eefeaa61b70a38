"""Logging in at the identity provider the broker names, as a public native client: the
authorization code flow with PKCE S256 on a loopback redirect (RFC 8252: 127.0.0.1, a port of our
own, /callback), or the device authorization grant (RFC 8628) for machines without a browser; and
renewing the tokens with the refresh token. The OAuth work is authlib's; the ID token is checked
(signature against the provider's JWKS, iss, aud, nonce) with pyjwt. Nothing here stores tokens."""

from __future__ import annotations

import html
import time
import webbrowser
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import jwt
import requests
from authlib.common.errors import AuthlibBaseError
from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session

from .errors import ClientError, NotLoggedIn, Refused, Unreachable

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TIMEOUT = 10  # seconds for each call to the provider
LOGIN_TIMEOUT = 300  # seconds a browser login may take
DEVICE_INTERVAL = 5  # RFC 8628 §3.2: the polling interval when the provider names none


@dataclass(frozen=True)
class LoginInfo:
    """What the broker publishes at /api/v1/cli: where and how its CLI logs in."""

    issuer: str
    client_id: str
    scopes: str
    audience: str
    vault_addr: str = ""

    @classmethod
    def from_json(cls, data: object, source: str) -> LoginInfo:
        if not isinstance(data, dict):
            raise ClientError(f"{source} did not answer with the CLI's login settings")
        values = {name: data.get(name) for name in ("issuer", "client_id", "scopes", "audience")}
        missing = [
            name for name, value in values.items() if not value or not isinstance(value, str)
        ]

        if missing:
            raise ClientError(f"{source} names no {', '.join(missing)} for the CLI's login")
        vault_addr = data.get("vault_addr")
        return cls(
            str(values["issuer"]),
            str(values["client_id"]),
            str(values["scopes"]),
            str(values["audience"]),
            vault_addr if isinstance(vault_addr, str) else "",
        )

    def as_json(self) -> dict[str, str]:
        return asdict(self)


def provider_metadata(issuer: str) -> dict:
    """The provider's discovery document, which must name `issuer` exactly (OIDC Discovery
    §4.3), so a broker cannot send our login to a look-alike."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = requests.get(url, timeout=TIMEOUT)
    except requests.RequestException as exc:
        text = f"cannot reach the identity provider at {issuer}: {_short(exc)}"
        raise Unreachable(text) from None
    if not response.ok:
        raise Unreachable(f"the identity provider at {issuer} answered HTTP {response.status_code}")
    try:
        document = response.json()
    except ValueError:
        raise Unreachable(f"the identity provider at {issuer} sent no discovery document") from None
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise ClientError(f"the identity provider at {url} does not call itself {issuer}")
    return document


def _session(info: LoginInfo, **kwargs: object) -> OAuth2Session:
    return OAuth2Session(
        info.client_id,
        scope=info.scopes,
        token_endpoint_auth_method="none",  # noqa: S106 (a public client: PKCE, no secret)
        **kwargs,
    )


def browser_login(
    info: LoginInfo,
    metadata: dict,
    show_url: Callable[[str], None],
    open_browser: bool = True,
    timeout: float = LOGIN_TIMEOUT,
) -> tuple[dict, dict]:
    """The authorization code flow with PKCE S256 on http://127.0.0.1:<port>/callback: the
    browser (opened, or the printed URL) comes back to a one-request server of ours. Returns the
    token response and its ID token's claims, checked."""
    with _CallbackServer() as server:
        redirect_uri = f"http://127.0.0.1:{server.port}/callback"
        session = _session(info, redirect_uri=redirect_uri, code_challenge_method="S256")
        verifier, nonce = generate_token(64), generate_token(24)
        url, state = session.create_authorization_url(
            metadata["authorization_endpoint"],
            code_verifier=verifier,
            nonce=nonce,
            resource=info.audience,
        )
        show_url(url)
        if open_browser:
            webbrowser.open(url)
        answer = server.wait(timeout)
    params = {name: values[0] for name, values in parse_qs(urlsplit(answer).query).items()}
    if params.get("state") != state:
        raise ClientError("the login's answer does not carry the state it was sent; try again")
    if "error" in params:
        text = params.get("error_description") or params["error"]
        raise Refused(f"the identity provider refused the login: {text}")
    if params.get("iss", info.issuer) != info.issuer:  # RFC 9207
        raise ClientError("the login's answer comes from another identity provider; try again")
    tokens = _call(
        info,
        lambda: session.fetch_token(
            metadata["token_endpoint"],
            authorization_response=answer,
            state=state,
            code_verifier=verifier,
            resource=info.audience,
        ),
    )
    return tokens, check_id_token(tokens, info, metadata, nonce)


def device_login(
    info: LoginInfo,
    metadata: dict,
    show_code: Callable[[dict], None],
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict, dict]:
    """The device authorization grant: show the code and where to enter it, then poll the token
    endpoint at the interval the provider asks for (5 s more on each slow_down)."""
    endpoint = metadata.get("device_authorization_endpoint")
    if not isinstance(endpoint, str):
        raise ClientError(
            f"the identity provider at {info.issuer} offers no device login; "
            "run jit login without --device"
        )
    session = _session(info)
    form = {"client_id": info.client_id, "scope": info.scopes, "resource": info.audience}
    try:
        response = session.post(endpoint, data=form, timeout=TIMEOUT, withhold_token=True)
        started = response.json()
    except requests.RequestException as exc:
        raise Unreachable(f"cannot reach the identity provider: {_short(exc)}") from None
    except ValueError:
        started = {}
    if not response.ok or not isinstance(started, dict) or "device_code" not in started:
        said = started if isinstance(started, dict) else {}
        text = said.get("error_description") or said.get("error") or f"HTTP {response.status_code}"
        raise ClientError(f"the identity provider refused a device login: {text}")
    show_code(started)
    interval = float(started.get("interval") or DEVICE_INTERVAL)
    deadline = time.monotonic() + float(started.get("expires_in") or 600)
    while time.monotonic() < deadline:
        sleep(interval)
        try:
            tokens = session.fetch_token(
                metadata["token_endpoint"],
                grant_type=DEVICE_CODE_GRANT,
                device_code=started["device_code"],
                resource=info.audience,
                timeout=TIMEOUT,
            )
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += 5
                continue
            if exc.error == "access_denied":
                raise Refused("the device login was refused at the identity provider") from None
            if exc.error == "expired_token":
                break
            raise ClientError(f"the device login failed: {exc.description or exc.error}") from None
        except requests.RequestException as exc:
            raise Unreachable(f"cannot reach the identity provider: {_short(exc)}") from None
        return tokens, check_id_token(tokens, info, metadata, None)
    raise ClientError("the code expired before anyone entered it; run jit login --device again")


def refresh_tokens(info: LoginInfo, metadata: dict, refresh_token: str) -> dict:
    """New tokens for the broker's API from the refresh token; a refusal means logging in
    again (NotLoggedIn), a provider out of reach is Unreachable."""
    session = _session(info)
    try:
        tokens = _call(
            info,
            lambda: session.refresh_token(
                metadata["token_endpoint"], refresh_token=refresh_token, resource=info.audience
            ),
        )
    except Unreachable:
        raise
    except ClientError as exc:
        raise NotLoggedIn(
            f"the identity provider would not renew your login ({exc}); run: jit login"
        ) from None
    if tokens.get("id_token"):
        check_id_token(tokens, info, metadata, None)
    return tokens


def check_id_token(tokens: dict, info: LoginInfo, metadata: dict, nonce: str | None) -> dict:
    """The ID token's claims, verified: signed by a key in the provider's JWKS, issued by the
    provider, for our client, unexpired, carrying our nonce (when we sent one)."""
    token = tokens.get("id_token")
    if not isinstance(token, str):
        raise ClientError("the identity provider sent no ID token (is openid among the scopes?)")
    try:
        key = jwt.PyJWKClient(metadata["jwks_uri"], timeout=TIMEOUT).get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm_name],
            audience=info.client_id,
            issuer=info.issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.PyJWKClientConnectionError as exc:
        raise Unreachable(f"cannot fetch the identity provider's keys: {exc}") from None
    except jwt.PyJWTError as exc:
        raise ClientError(f"the identity provider's ID token is not valid: {exc}") from None
    if nonce is not None and claims.get("nonce") != nonce:
        raise ClientError("the ID token does not carry this login's nonce; try again")
    return claims


def _call(info: LoginInfo, step: Callable[[], dict]) -> dict:
    """One token request: its OAuth error as one line, an unreachable provider as Unreachable."""
    try:
        return dict(step())
    except OAuthError as exc:
        text = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
        raise ClientError(text) from None
    except AuthlibBaseError as exc:  # e.g. the state did not match
        raise ClientError(f"the login failed: {exc.description or exc.error}") from None
    except requests.RequestException as exc:
        raise Unreachable(
            f"cannot reach the identity provider at {info.issuer}: {_short(exc)}"
        ) from None


def _short(exc: Exception) -> str:
    """A requests error in a few words (its full text repeats the URL and the pool's internals)."""
    if isinstance(exc, requests.ConnectionError):
        return "connection refused or no route"
    if isinstance(exc, requests.Timeout):
        return "it did not answer in time"
    return type(exc).__name__


class _CallbackServer:
    """A one-shot HTTP server on 127.0.0.1 and a port the kernel picks: it takes the first
    request to /callback (the provider's redirect, in the user's browser) and answers a page
    that sends the user back to the terminal."""

    def __init__(self) -> None:
        self.answer = ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                if urlsplit(self.path).path != "/callback" or outer.answer:
                    self.send_error(404)
                    return
                outer.answer = f"http://127.0.0.1:{outer.port}{self.path}"
                failed = "error=" in self.path
                text = (
                    "The login was refused; see your terminal."
                    if failed
                    else "You are logged in to jit. You may close this tab."
                )
                body = f"<!doctype html><title>jit login</title><p>{html.escape(text)}</p>"
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass  # the query holds the code: never on the terminal

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.server.timeout = 0.5
        self.port = self.server.server_address[1]

    def __enter__(self) -> _CallbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.server_close()

    def wait(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self.answer:
            if time.monotonic() > deadline:
                raise ClientError(f"no login arrived within {int(timeout)} s; run jit login again")
            self.server.handle_request()
        return self.answer
