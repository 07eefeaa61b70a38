"""HTTP: the browser UI, the JSON API and the OIDC login. Thin views over `Grants`; errors map to
statuses in this one place (JSON under /api/, a page elsewhere)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Flask, Response, current_app, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from ..durations import format_duration
from ..errors import BrokerError, Unauthenticated

if TYPE_CHECKING:
    from ..services import Services

log = logging.getLogger(__name__)


def services() -> Services:
    return current_app.extensions["jit"]


def init_app(app: Flask) -> None:
    from . import (
        api,
        audit_key,
        audit_pages,
        auth,
        cli_login,
        health,
        oauth,
        token_endpoint,
        ui,
    )

    csrf = CSRFProtect(app)
    csrf.exempt(api.bp)  # bearer tokens, no cookies: nothing for a forged form to ride on
    auth.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(cli_login.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(audit_key.bp)
    app.register_blueprint(audit_pages.bp)
    app.register_blueprint(oauth.bp)
    csrf.exempt(token_endpoint.init_app(app))  # OAuth clients post forms without cookies
    app.register_error_handler(BrokerError, _broker_error)
    app.register_error_handler(CSRFError, _csrf_error)
    app.register_error_handler(HTTPException, _http_error)
    app.after_request(_security_headers)
    app.add_template_filter(format_duration, "duration")


def _wants_json() -> bool:
    return request.path.startswith(("/api/", "/.well-known/"))


def _answer(status: int, code: str, detail: str, **extra: list[str]) -> Response:
    if _wants_json():
        response = jsonify({"error": code, "detail": detail, **extra})
    else:
        response = current_app.make_response(
            (render_template("error.html", status=status, code=code, detail=detail), status)
        )
    response.status_code = status
    return response


def _broker_error(exc: BrokerError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s: %s", request.method, request.path, exc.detail)
    extra = {
        name: list(exc.context[name]) for name in ("reasons", "approvers") if exc.context.get(name)
    }
    response = _answer(exc.status, exc.code, exc.detail, **extra)
    if isinstance(exc, Unauthenticated) and _wants_json():
        # RFC 6750 §3: no error code when the request carried no token at all.
        challenge = 'Bearer realm="jit-broker"'
        if request.headers.get("Authorization"):
            description = _challenge_text(exc.detail)
            challenge += f', error="invalid_token", error_description="{description}"'
        response.headers["WWW-Authenticate"] = challenge
    return response


def _challenge_text(text: str) -> str:
    """RFC 6750 §3: error_description holds printable ASCII but for " and \\. A refusal may
    quote a token's header, which its sender chose: anything else becomes "?"."""
    text = text.replace('"', "'")
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)[:200]


def _csrf_error(exc: CSRFError) -> Response:
    return _answer(400, "csrf_failed", f"{exc.description} Reload the page and try again.")


def _http_error(exc: HTTPException) -> Response:
    original = getattr(exc, "original_exception", None)
    if isinstance(original, BrokerError):
        # Raised where Flask has no handler of ours (saving the session after the view): Flask
        # makes it a 500, but the broker knows what it is (the store full: a 503).
        return _broker_error(original)
    return _answer(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or "")


def _security_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'"
    )
    return response
