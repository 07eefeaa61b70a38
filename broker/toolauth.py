"""What a tool (an OAuth protected resource, e.g. an MCP server) imports to check the access tokens
the broker issues for it: the broker's JWKS, an exact issuer and audience, the scopes, and
optionally introspection (RFC 7662). It imports Flask never, and of the broker only `errors` and
`identity` (the key cache and the header checks, which themselves import only errors/models)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jwt
import requests

from .errors import BrokerError, InsufficientScope, InvalidToken, ProviderUnavailable
from .identity import ProviderKeys, checked_header

log = logging.getLogger(__name__)

# The broker signs with an OpenBao transit key of type ecdsa-p256: nothing else is accepted.
ALGORITHMS = ["ES256"]
# RFC 9068 §2.2 plus the delegation (`act`, RFC 8693 §4.1) every task token carries.
REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "sub", "client_id", "jti", "scope", "act"]


@dataclass(frozen=True)
class ToolToken:
    """A verified access token: who it is for (`subject`, the person, or the agent when there is
    none), the agent using it (`actor`), the client it was issued to, and its scopes."""

    subject: str
    actor: str
    client_id: str
    scopes: frozenset[str]
    expires_at: int
    jti: str
    claims: dict = field(repr=False, compare=False)


class ClientCredentials:
    """The tool's own access token from the OIDC provider (client credentials, RFC 6749 §4.4,
    client_secret_basic), for `resource` (the broker's API audience): fetched from the token
    endpoint the provider's discovery document names, and reused until `margin` seconds before
    it expires. Call it for the token. The provider not answering, or refusing, raises
    ProviderUnavailable (a tool asking introspection then fails closed)."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str,
        resource: str,
        margin: float = 30,
        timeout: float = 5,
        clock: Callable[[], float] = time.time,
    ):
        self.issuer = issuer.rstrip("/")
        self.auth = (client_id, client_secret)
        self.resource = resource
        self.margin = margin
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._token_endpoint: str | None = None
        self._cached: tuple[str, float] | None = None  # the token and when it expires

    def __call__(self) -> str:
        with self._lock:
            if self._cached is None or self.clock() >= self._cached[1] - self.margin:
                self._cached = self._fetch()
            return self._cached[0]

    def forget(self) -> None:
        """Drop the cached token: the next call fetches a new one."""
        with self._lock:
            self._cached = None

    def _fetch(self) -> tuple[str, float]:
        now = self.clock()
        answer = self._json(
            "token endpoint",
            lambda: requests.post(
                self._endpoint(),
                data={"grant_type": "client_credentials", "resource": self.resource},
                auth=self.auth,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            ),
        )
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderUnavailable("the provider's token endpoint answered no access_token")
        return token, _expiry(token, answer.get("expires_in"), now)

    def _endpoint(self) -> str:
        if self._token_endpoint is None:
            url = f"{self.issuer}/.well-known/openid-configuration"
            document = self._json(
                "discovery document", lambda: requests.get(url, timeout=self.timeout)
            )
            endpoint = document.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise ProviderUnavailable(
                    f"the provider's discovery ({url}) names no token_endpoint"
                )
            self._token_endpoint = endpoint
        return self._token_endpoint

    def _json(self, what: str, call: Callable[[], requests.Response]) -> dict:
        try:
            response = call()
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"cannot reach the provider's {what}: {exc}") from exc
        if response.status_code != 200:
            raise ProviderUnavailable(
                f"the provider's {what} answered {response.status_code}: {response.text[:200]}"
            )
        try:
            answer = response.json()
        except ValueError:
            raise ProviderUnavailable(f"the provider's {what} answered no JSON") from None
        if not isinstance(answer, dict):
            raise ProviderUnavailable(f"the provider's {what} answered no JSON object")
        return answer


def _expiry(token: str, expires_in: object, now: float) -> float:
    """When a provider token expires: its `exp` when it is a JWT, else now + `expires_in`, else
    now (used once)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        exp = None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return now + float(expires_in)
    return now


class Introspection:
    """The client side of RFC 7662: asks the broker whether a token is still active (a task
    window closed, released or revoked makes it inactive before its `exp`). The tool
    authenticates with its own access token from the OIDC provider as `Authorization: Bearer`
    (`bearer` returns it, e.g. a ClientCredentials; its client id must be the tool's
    `introspection_client` in the broker's policy). Any answer other than a JSON object with
    `"active": true` counts as inactive; no answer at all, or a refusal of the tool's own
    token, raises ProviderUnavailable, so the caller fails closed."""

    def __init__(self, endpoint: str, bearer: Callable[[], str], timeout: float = 5):
        self.endpoint = endpoint
        self.bearer = bearer
        self.timeout = timeout

    def __call__(self, token: str) -> bool:
        response = self._ask(token)
        if response.status_code == 401 and hasattr(self.bearer, "forget"):
            # The tool's own token was refused (expired early, revoked): once with a new one.
            self.bearer.forget()
            response = self._ask(token)
        if response.status_code != 200:
            raise ProviderUnavailable(f"the broker's introspection answered {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            raise ProviderUnavailable("the broker's introspection answered no JSON") from None
        return isinstance(answer, dict) and answer.get("active") is True

    def _ask(self, token: str) -> requests.Response:
        try:
            return requests.post(
                self.endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                headers={
                    "Accept": "application/json",
                    "Authorization": f"Bearer {self.bearer()}",
                },
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ProviderUnavailable(f"cannot reach the broker's introspection: {exc}") from exc


class ToolTokenVerifier:
    """Checks a bearer token sent to one tool, the RFC 8725 way: algorithm pinned to ES256,
    `typ` at+jwt, the key from the broker's JWKS only (cached, refetched at most once per
    cooldown: `identity.ProviderKeys`), the exact issuer, an `aud` that is exactly this tool's
    resource (a token for another tool is refused even if it also names this one), and the
    claims a task token always has. Every way a token can be wrong raises InvalidToken."""

    def __init__(
        self,
        issuer: str,
        jwks_uri: str,
        resource: str,
        introspect: Callable[[str], bool] | None = None,
        leeway: int = 30,
        keys: ProviderKeys | None = None,
        jwks_cooldown: float = 30,
    ):
        self.issuer = issuer
        self.resource = resource
        self.keys = keys or ProviderKeys(jwks_uri, cooldown=jwks_cooldown)
        self.introspect = introspect
        self.leeway = leeway

    def verify(self, token: str) -> ToolToken:
        """The verified token, or InvalidToken saying why. ProviderUnavailable when neither the
        key nor (with introspection) the token's state can be learnt: refuse, but as a 503."""
        try:
            header = checked_header(token, ALGORITHMS)
        except BrokerError as exc:
            raise InvalidToken(exc.detail) from None
        key = self.keys.get(header["kid"])
        if key is None:
            raise InvalidToken("the token was not signed by a key of the broker")
        if key.algorithm_name != header["alg"]:
            raise InvalidToken("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=ALGORITHMS,
                audience=self.resource,
                issuer=self.issuer,
                leeway=self.leeway,
                # strict_aud: `aud` must be this resource as a string, not a list naming others.
                options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the access token has expired") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"the access token is not valid: {exc}") from None
        verified = _tool_token(claims)
        if self.introspect is not None and not self.introspect(token):
            raise InvalidToken("the access token is no longer active")
        return verified


def require_scope(token: ToolToken, scope: str) -> None:
    """Refuse (403 insufficient_scope, RFC 6750 §3.1) an action the token's scopes do not cover."""
    if scope not in token.scopes:
        raise InsufficientScope(f"this needs the scope {scope!r}", scope=scope)


def _tool_token(claims: dict) -> ToolToken:
    """The claims' shapes, checked: strings where RFC 9068 / RFC 8693 say strings."""
    subject, client_id, jti, scope, act = (
        claims["sub"],
        claims["client_id"],
        claims["jti"],
        claims["scope"],
        claims["act"],
    )
    for name, value in (("sub", subject), ("client_id", client_id), ("jti", jti)):
        if not isinstance(value, str) or not value:
            raise InvalidToken(f"the access token's {name} is not a string")
    if not isinstance(scope, str):
        raise InvalidToken("the access token's scope is not a space-separated string")
    if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
        raise InvalidToken("the access token names no agent (act.sub)")
    return ToolToken(
        subject=subject,
        actor=act["sub"],
        client_id=client_id,
        scopes=frozenset(scope.split()),
        expires_at=int(claims["exp"]),
        jti=jti,
        claims=claims,
    )
