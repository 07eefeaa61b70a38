"""Browser login through the organisation's OIDC provider: authorization code flow with PKCE S256,
state and nonce (authlib), exact redirect URI from the config. Keeps the Principal in the
session."""

from __future__ import annotations

from authlib.integrations.flask_client import OAuth, OAuthError
from flask import Blueprint, Flask, current_app, redirect, session, url_for

from ..errors import InvalidRequest
from ..identity import principal_from_claims
from ..models import Principal
from . import services

bp = Blueprint("auth", __name__, url_prefix="/auth")


def init_app(app: Flask) -> None:
    oidc = app.extensions["jit"].settings.oidc
    oauth = OAuth(app)
    oauth.register(
        "oidc",
        client_id=oidc["client_id"],
        client_secret=oidc["client_secret"],
        server_metadata_url=app.extensions["jit"].metadata.url,
        client_kwargs={
            "scope": oidc["scopes"],
            "code_challenge_method": "S256",
            "token_endpoint_auth_method": "client_secret_basic",
        },
    )


def _client():
    return current_app.extensions["authlib.integrations.flask_client"].oidc


def current_principal() -> Principal | None:
    claims = session.get("principal")
    return Principal.from_claims(claims) if claims else None


@bp.get("/login")
def login():
    services().metadata.get()  # the provider's issuer is checked before we send anyone there
    return _client().authorize_redirect(services().settings.redirect_uri)


@bp.get("/callback")
def callback():
    settings = services().settings
    try:
        token = _client().authorize_access_token(
            claims_options={"iss": {"essential": True, "value": settings.oidc["issuer"]}}
        )
    except OAuthError as exc:
        raise InvalidRequest(f"login failed: {exc.description or exc.error}") from None
    if not token.get("userinfo"):
        raise InvalidRequest("login failed: the provider returned no ID token")
    principal = principal_from_claims(dict(token["userinfo"]), settings.oidc["groups_claim"])
    session.clear()  # a fresh session on login: nothing carried over from before it
    session["principal"] = principal.claims()
    session.permanent = True
    return redirect(url_for("ui.index"))


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("ui.index"))
