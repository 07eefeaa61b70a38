"""jit-broker: just-in-time elevation with verified removal. `create_app` builds the services,
makes the Flask app around them and starts their threads; it does nothing else, and nothing here
runs at import time. The app's modules are imported when it is built, so that a tool can import
broker.toolauth alone, without Flask or the broker's services."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from .config import Settings

HERE = Path(__file__).resolve().parent
# An installed wheel carries the templates as broker/templates; a checkout keeps them at the top.
TEMPLATES = HERE / "templates" if (HERE / "templates").is_dir() else HERE.parent / "templates"


def create_app(settings: Settings | None = None) -> Flask:
    """The broker's web app, its services on `app.extensions["jit"]`, their threads running:
    whoever serves it calls `app.extensions["jit"].stop()` once it stops taking requests."""
    from flask import Flask

    from . import web
    from .config import load_settings
    from .services import Services

    settings = settings or load_settings()
    services = Services.build(settings)
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config.update(
        SECRET_KEY=settings.server["secret_key"] or settings.secret_file("session.key"),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.server["base_url"].startswith("https://"),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    app.extensions["jit"] = services
    web.init_app(app)
    services.start()
    return app
