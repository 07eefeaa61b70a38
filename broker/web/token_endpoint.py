"""The broker as the OAuth authorization server for tools, on authlib's Flask AuthorizationServer:
the token endpoint (RFC 8693 token exchange only), introspection (RFC 7662) and revocation (RFC
7009). authlib parses the requests, authenticates the callers through the methods registered here
and writes every answer and error (JSON, Cache-Control: no-store). An agent authenticates with
its client-credentials token from the OIDC provider (the `actor_token`, RFC 8693 §2.1) or with
private_key_jwt (RFC 7523) when `[oauth.clients]` registers its keys, a tool with its provider
token as `Authorization: Bearer`; each method returns a client object made from the verified
identity. The task is named by its subject token or by the person's own access token (verified
here like an API token). The use cases (what a token may carry, recording it) are `grants`'."""

from __future__ import annotations

from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    BaseGrant,
    InvalidClientError,
    InvalidRequestError,
    OAuth2Error,
    TokenEndpointMixin,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7523.client import ASSERTION_TYPE
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Blueprint, Flask, Response, current_app

from ..backends.tool_task import SUBJECT_TOKEN_TYPE
from ..errors import BrokerError, ProviderUnavailable, TokenRefused
from ..grants.exchange import ACCESS_TOKEN_TYPE
from ..models import Principal
from ..oauth.client_assertion import ClientAssertion
from ..oauth.clients import PRIVATE_KEY_JWT
from ..oauth.metadata import TOKEN_EXCHANGE
from . import services

bp = Blueprint("oauth_server", __name__)
ACTOR_TOKEN = "actor_token"  # noqa: S105 - the name of an auth method
TOOL_BEARER = "tool_bearer"
# Form parameters that may appear once only (RFC 6749 §3.2, RFC 8693 §2.1, RFC 7523 §2.2).
SINGLE = ("grant_type", "subject_token", "subject_token_type", "actor_token", "actor_token_type")
ASSERTION_PARAMETERS = ("client_assertion", "client_assertion_type", "client_id")
# What names the task (RFC 8693 §3): the broker's own subject token, or the person's access token.
SUBJECT_TOKEN_TYPES = (SUBJECT_TOKEN_TYPE, ACCESS_TOKEN_TYPE)


class Caller:
    """An authenticated agent or tool, as authlib's client: its identity from the provider."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.client_id = principal.client_id

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return True

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == TOKEN_EXCHANGE


def _agent_from_actor_token(query_client: Any, request: Any) -> Caller:
    """RFC 8693 §2.1: the agent's client-credentials JWT from the OIDC provider."""
    form = request.form
    token = form.get("actor_token")
    if not token:
        raise InvalidClientError(status_code=401, description="send actor_token: your access token")
    if form.get("actor_token_type") != ACCESS_TOKEN_TYPE:
        raise InvalidRequestError(description=f"actor_token_type must be {ACCESS_TOKEN_TYPE}")
    try:
        principal = services().verifier.verify(token)
    except BrokerError as exc:
        raise InvalidClientError(status_code=401, description=_safe(exc.detail)) from None
    if principal.kind != "agent":
        raise InvalidClientError(
            status_code=401, description="the actor token is not an agent's (client credentials)"
        )
    return Caller(principal)


def _agent_from_private_key_jwt(query_client: Any, request: Any) -> Caller | None:
    """RFC 7523 §2.2: a client assertion signed with a key [oauth.clients] registers for the
    agent; None when the request carries none (another method's request)."""
    form = request.form
    if not form.get("client_assertion") and not form.get("client_assertion_type"):
        return None
    for name in ASSERTION_PARAMETERS:
        if len(request.payload.datalist.get(name, [])) > 1:
            raise InvalidRequestError(description=f"{name} appears more than once")
    if form.get("actor_token"):
        raise InvalidRequestError(description="authenticate once: client_assertion or actor_token")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise InvalidClientError(
            status_code=401, description=f"client_assertion_type must be {ASSERTION_TYPE}"
        )
    jit = services()
    check = ClientAssertion(jit.signer.issuer, jit.grants.first_use, jit.settings.oidc["leeway"])
    try:
        client = check(jit.agent_clients.get, request)
    except InvalidClientError as exc:  # authlib's are 400s; RFC 6749 §5.2 allows 401, as above
        raise InvalidClientError(status_code=401, description=_safe(exc.description)) from None
    if client is None:
        raise InvalidClientError(status_code=401, description="send a client_assertion")
    if form.get("client_id") not in (None, client.client_id):
        raise InvalidClientError(status_code=401, description="client_id is not the assertion's")
    return Caller(client.principal())


def _person(subject_token: object) -> Principal:
    """The person whose own access token is the subject token: verified like an API token (the
    provider's key, exact issuer and audience, pinned algorithms)."""
    if not isinstance(subject_token, str):
        raise OAuthError("invalid_grant", "the subject token is not an access token")
    try:
        return services().verifier.verify(subject_token)
    except ProviderUnavailable as exc:
        raise OAuthError("temporarily_unavailable", exc.detail, status_code=503) from None
    except BrokerError as exc:
        raise OAuthError("invalid_grant", f"the subject token is refused: {exc.detail}") from None


def _tool_from_bearer(query_client: Any, request: Any) -> Caller:
    """A tool's own client-credentials JWT from the OIDC provider, as Authorization: Bearer."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidClientError(status_code=401, description="send Authorization: Bearer")
    try:
        principal = services().verifier.verify(token.strip())
    except BrokerError as exc:
        raise InvalidClientError(status_code=401, description=_safe(exc.detail)) from None
    if principal.kind != "agent":
        raise InvalidClientError(status_code=401, description="not a client-credentials token")
    return Caller(principal)


class TokenExchangeGrant(BaseGrant, TokenEndpointMixin):
    GRANT_TYPE = TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = [PRIVATE_KEY_JWT, ACTOR_TOKEN]  # the first that applies

    def validate_token_request(self) -> None:
        for name in SINGLE:
            if len(self.request.payload.datalist.get(name, [])) > 1:
                raise InvalidRequestError(description=f"{name} appears more than once")
        form = self.request.form
        if not form.get("subject_token"):
            raise InvalidRequestError(description="subject_token is required")
        if form.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
            raise InvalidRequestError(
                description=f"subject_token_type must be {' or '.join(SUBJECT_TOKEN_TYPES)}"
            )
        resources = self.request.payload.datalist.get("resource", [])
        if len(resources) != 1:
            raise OAuthError("invalid_target", "name exactly one resource: the tool's URI")
        requested = form.get("requested_token_type")
        if requested not in (None, ACCESS_TOKEN_TYPE):
            raise InvalidRequestError(description=f"only {ACCESS_TOKEN_TYPE} is issued")
        self.request.client = self.authenticate_token_endpoint_client()

    def create_token_response(self) -> tuple[int, dict, list]:
        form = self.request.form
        subject: object = form.get("subject_token")
        if form.get("subject_token_type") == ACCESS_TOKEN_TYPE:
            subject = _person(subject)
        try:
            issued = services().grants.exchange(
                self.request.client.principal,
                subject,
                form.get("resource"),
                form.get("scope"),
                services().signer.issue,
            )
        except TokenRefused as exc:
            raise OAuthError(exc.code, exc.detail) from None
        return (
            200,
            {
                "access_token": issued.access_token,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "scope": issued.scope,
            },
            self.TOKEN_RESPONSE_HEADER,
        )


class OAuthError(OAuth2Error):
    """An OAuth error with any code (authlib has no class for RFC 8707's invalid_target)."""

    def __init__(self, error: str, description: str, status_code: int | None = None) -> None:
        super().__init__(description=_safe(description), status_code=status_code)
        self.error = error


class IssuedToken(dict):
    """A token's verified claims as authlib's introspection reads them: revoked unless the
    broker says it is active (recorded, not revoked, its task active and inside its window)."""

    def is_expired(self) -> bool:
        return False  # the signer checked exp

    def is_revoked(self) -> bool:
        return not services().grants.token_active(self["jti"], int(self["exp"]))

    def check_client(self, client: Caller) -> bool:
        """RFC 7009 §2.1: an agent revokes only its own tokens (another's: nothing revoked)."""
        return bool(self.get("client_id") == client.client_id)


class Introspection(IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = [TOOL_BEARER]

    def query_token(self, token: str, token_type_hint: str | None) -> IssuedToken | None:
        claims = services().signer.verify(token)
        return IssuedToken(claims) if claims is not None else None

    def check_permission(self, token: dict, client: Caller, request: Any) -> bool:
        tool = _tool_of(token)
        return (
            tool is not None
            and bool(tool.introspection_client)
            and (tool.introspection_client == client.client_id)
        )

    def introspect_token(self, token: dict) -> dict:
        names = ("scope", "client_id", "sub", "aud", "exp", "iat", "iss", "jti", "act")
        return {"active": True, "token_type": "Bearer", **{n: token[n] for n in names}}

    def create_endpoint_response(self, request: Any) -> tuple[int, dict, list]:
        # A token this broker did not sign (or that another tool may not see) is inactive, not
        # an error (RFC 7662 §2.2).
        try:
            return super().create_endpoint_response(request)
        except OAuth2Error as exc:
            if exc.error in ("invalid_client", "invalid_request"):
                raise
            return 200, {"active": False}, list(self.INTROSPECTION_HEADERS)

    INTROSPECTION_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class Revocation(RevocationEndpoint):
    """RFC 7009 §2.2: the answer is 200 whether or not anything was revoked. A token that is
    malformed, not this broker's, unknown or another agent's is left alone and nothing is
    recorded (authlib answers invalid_grant for another client's token: overridden here, as that
    would tell an agent which tokens exist and whose they are)."""

    CLIENT_AUTH_METHODS = [PRIVATE_KEY_JWT, ACTOR_TOKEN]

    def authenticate_token(self, request: Any, client: Caller) -> IssuedToken | None:
        self.check_params(request, client)
        token = self.query_token(request.form["token"], request.form.get("token_type_hint"))
        if token is None or not token.check_client(client):
            return None
        return token

    def query_token(self, token: str, token_type_hint: str | None) -> IssuedToken | None:
        claims = services().signer.verify(token)
        return IssuedToken(claims) if claims is not None else None

    def check_permission(self, token: dict, client: Caller, request: Any) -> bool:
        return bool(token.get("client_id") == client.client_id)

    def revoke_token(self, token: dict, request: Any) -> None:
        services().grants.revoke_token(request.client.principal, token["jti"])


def _safe(text: object) -> str:
    """An error_description authlib accepts (RFC 6749 §5.2: printable ASCII but " and \\): the
    text of a refusal may quote what the caller sent, and anything else would be a 500."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in str(text or ""))


def _tool_of(claims: dict) -> Any:
    for tool in services().policy.current().tools.values():
        if tool.resource == claims.get("aud"):
            return tool
    return None


def init_app(app: Flask) -> Blueprint:
    """One authlib server per app (tests build many); returns the blueprint to exempt from CSRF."""
    server = AuthorizationServer()
    app.extensions["jit_oauth_server"] = server
    server.init_app(app, query_client=lambda client_id: None, save_token=lambda t, r: None)
    server.register_client_auth_method(PRIVATE_KEY_JWT, _agent_from_private_key_jwt)
    server.register_client_auth_method(ACTOR_TOKEN, _agent_from_actor_token)
    server.register_client_auth_method(TOOL_BEARER, _tool_from_bearer)
    server.register_grant(TokenExchangeGrant)
    server.register_endpoint(Introspection)
    server.register_endpoint(Revocation)
    app.register_blueprint(bp)
    return bp


def _server() -> AuthorizationServer:
    return current_app.extensions["jit_oauth_server"]


@bp.post("/oauth/token")
def token() -> Response:
    return _server().create_token_response()


@bp.post("/oauth/introspect")
def introspect() -> Response:
    return _server().create_endpoint_response(Introspection.ENDPOINT_NAME)


@bp.post("/oauth/revoke")
def revoke() -> Response:
    return _server().create_endpoint_response(Revocation.ENDPOINT_NAME)
