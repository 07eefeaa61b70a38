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
        metrics,
        oauth,
        request_ids,
        token_endpoint,
        ui,
    )

    request_ids.init_app(app)

    csrf = CSRFProtect(app)
    csrf.exempt(api.bp)  # bearer tokens, no cookies: nothing for a forged form to ride on
    auth.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(cli_login.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(health.bp)
    metrics.init_app(app)
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
    return request.path.startswith(("/api/", "/.well-known/", "/metrics"))


def _answer(status: int, code: str, detail: str, **extra: list[str]) -> Response:
    if _wants_json():
        response = jsonify({"error": code, "detail": detail, **extra})
    else:
        page = render_template("error.html", status=status, code=code, detail=detail, back=_back())
        response = current_app.make_response((page, status))
    response.status_code = status
    return response


def _back() -> str | None:
    """Where an error page's "Back" leads: the page the failed request came from, as far as its
    path tells (the browser sends no Referer: Referrer-Policy no-referrer); None: home."""
    parts = request.path.strip("/").split("/")
    if parts[0] in ("audit", "audit.csv", "audit.jsonl") and request.path != "/audit":
        return "/audit"
    if parts[0] == "requests" and len(parts) == 3 and request.method == "POST":
        return "/approvals" if parts[2] in ("approve", "deny") else f"/requests/{parts[1]}"
    return None


def _broker_error(exc: BrokerError) -> Response:
    from .metrics import count_dependency_error

    count_dependency_error(exc)
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
    # Every asset is the broker's own file: no inline script or style, no other origin.
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    )
    return response
