"""The browser pages: what you may request, your grants, the credential shown once."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec

from flask import (
    Blueprint,
    Response,
    abort,
    flash,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue

from ..errors import BrokerError
from ..models import Grant, IssuedCredential, Principal
from . import services, task_form
from .auth import current_principal, fresh_principal

bp = Blueprint("ui", __name__)

P = ParamSpec("P")


def login_required(view: Callable[P, ResponseReturnValue]) -> Callable[P, ResponseReturnValue]:
    @wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> ResponseReturnValue:
        g.principal = current_principal()
        if g.principal is None:
            return redirect(url_for("ui.index"))
        return view(*args, **kwargs)

    return wrapper


# Actions that must rest on the claims the provider holds now, not on those of the login: each
# confirms them first (a refresh), so someone removed from a group cannot act on the old ones.
# Release and cancel only give something up: they go on even when the provider is unreachable.
CONFIRMED_ACTIONS = {"approve", "deny", "activate", "extend", "review"}


@bp.app_context_processor
def inject_principal() -> dict[str, Principal | None]:
    return {"principal": current_principal()}


@bp.get("/")
def index() -> ResponseReturnValue:
    principal = current_principal()
    if principal is None:
        return render_template("login.html")
    return _home(principal)


def _home(
    principal: Principal, error: BrokerError | None = None, form: dict | None = None
) -> tuple[str, int]:
    grants = services().grants
    eligible = grants.eligible(principal)
    break_glass = grants.break_glass_eligible(principal)
    agents, scopes = task_form.offers(eligible)
    page = render_template(
        "index.html",
        entitlements=eligible + [e for e in break_glass if e not in eligible],
        break_glass=break_glass,
        grants=grants.mine(principal),
        error=error,
        form=form or {},
        task_entitlements=[e.name for e in eligible if e.task is not None],
        agents=agents,
        scopes=scopes,
        checked=task_form.checked(form or {}),
    )
    return page, error.status if error else 200


@bp.post("/requests")
@login_required
def create_request() -> ResponseReturnValue:
    g.principal = fresh_principal()  # a request, a break-glass activation: on current claims
    form = request.form
    grants = services().grants
    chosen = grants.policy().entitlements.get(form.get("entitlement") or "")
    agent, tools = task_form.asked(form, chosen)
    try:
        grant, credential = grants.request(
            g.principal,
            form.get("entitlement"),
            form.get("duration"),
            form.get("reason"),
            form.get("ticket", ""),
            form.get("public_key", ""),
            form.get("break_glass") == "1",
            agent,
            tools,
        )
    except BrokerError as exc:
        return _home(g.principal, exc, form)
    if credential is None:
        flash(f"Requested {grant.entitlement}: waiting for approval.")
        return redirect(url_for("ui.show_request", grant_id=grant.id))
    return _credential_page(grant, credential)


def _credential_page(grant: Grant, credential: IssuedCredential) -> Response:
    exchanges = task_form.exchanges(grant, services().grants.policy().tools)
    response = make_response(
        render_template(
            "credential.html",
            grant=grant,
            credential=credential,
            exchanges=exchanges,
            exchange_fields=task_form.exchange_fields,
            token_endpoint=services().settings.server["base_url"].rstrip("/") + "/oauth/token",
        )
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/requests/<grant_id>")
@login_required
def show_request(grant_id: str) -> str:
    grants = services().grants
    grant = grants.get(g.principal, grant_id)
    return render_template(
        "grant.html",
        grant=grant,
        view=grants.describe(grant),
        chain=grants.chain(grant.id),
        mine=grant.owned_by(g.principal),
        may_review=grants.may_review(g.principal, grant) and not grant.reviewed_at,
    )


@bp.get("/approvals")
@login_required
def approvals() -> str:
    grants = services().grants
    queue = [grants.describe(grant) for grant in grants.approval_queue(g.principal)]
    return render_template("approvals.html", queue=queue)


@bp.post("/requests/<grant_id>/<action>")
@login_required
def act(grant_id: str, action: str) -> ResponseReturnValue:
    """One form post per button: approve, deny, cancel, release, review; activate and extend
    show a new secret."""
    grants, form = services().grants, request.form
    if action in CONFIRMED_ACTIONS:
        g.principal = fresh_principal()
    if action == "activate":
        return _credential_page(*grants.activate(g.principal, grant_id, form.get("public_key", "")))
    if action == "extend":
        return _credential_page(
            *grants.extend(g.principal, grant_id, form.get("duration"), form.get("public_key", ""))
        )
    done = {
        "approve": lambda: grants.approve(g.principal, grant_id, form.get("reason", "")),
        "deny": lambda: grants.deny(g.principal, grant_id, form.get("reason")),
        "cancel": lambda: grants.cancel(g.principal, grant_id),
        "release": lambda: grants.release(g.principal, grant_id),
        "review": lambda: grants.review(
            g.principal, grant_id, form.get("outcome"), form.get("notes")
        ),
    }
    if action not in done:
        abort(404)
    grant = done[action]()
    flash(f"{action.capitalize()}: {grant.entitlement} is now {grant.status.replace('_', ' ')}.")
    if action in ("approve", "deny"):
        return redirect(url_for("ui.approvals"))
    return redirect(url_for("ui.show_request", grant_id=grant.id))
