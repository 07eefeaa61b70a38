"""The browser pages: what you may request, your grants, the credential shown once."""

from __future__ import annotations

from functools import wraps

from flask import Blueprint, flash, g, make_response, redirect, render_template, request, url_for

from ..errors import BrokerError
from . import services
from .auth import current_principal

bp = Blueprint("ui", __name__)


def login_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        g.principal = current_principal()
        if g.principal is None:
            return redirect(url_for("ui.index"))
        return view(*args, **kwargs)

    return wrapper


@bp.app_context_processor
def inject_principal():
    return {"principal": current_principal()}


@bp.get("/")
def index():
    principal = current_principal()
    if principal is None:
        return render_template("login.html")
    return _home(principal)


def _home(principal, error: BrokerError | None = None, form: dict | None = None):
    grants = services().grants
    page = render_template(
        "index.html",
        entitlements=grants.eligible(principal),
        grants=grants.mine(principal),
        error=error,
        form=form or {},
    )
    return page, error.status if error else 200


@bp.post("/requests")
@login_required
def create_request():
    form = request.form
    try:
        grant, credential = services().grants.request(
            g.principal, form.get("entitlement"), form.get("duration"), form.get("reason")
        )
    except BrokerError as exc:
        return _home(g.principal, exc, form)
    response = make_response(render_template("credential.html", grant=grant, credential=credential))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/requests/<grant_id>")
@login_required
def show_request(grant_id: str):
    grant = services().grants.get(g.principal, grant_id)
    return render_template("grant.html", grant=grant, chain=services().grants.chain(grant.id))


@bp.post("/requests/<grant_id>/release")
@login_required
def release(grant_id: str):
    grant = services().grants.release(g.principal, grant_id)
    flash(f"Released {grant.entitlement}: the credential is being revoked and verified.")
    return redirect(url_for("ui.show_request", grant_id=grant.id))
