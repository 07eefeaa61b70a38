"""The browser pages: your grants, what you may request and its form, the credential shown once,
the approvers' queue with the break-glass reviews due, the grant's page. Thin: it reads through
`Grants`, changes nothing itself, and answers every form post with a redirect (POST-redirect-GET),
so a reload never sends a form again. A new secret is kept in the server-side session for exactly
one view of the credential page, then dropped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
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
    send_from_directory,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue

from ..durations import format_duration
from ..errors import BrokerError
from ..grants.base import AWAITING, OPEN
from ..models import ACTIVE, ISSUING, REVOKE_FAILED, Grant, IssuedCredential, Principal, utcnow
from ..policy import Entitlement
from . import services, task_form, words
from .auth import current_principal, fresh_principal, safe_next

# The stylesheet, the script and the icon: served by the broker itself (an installed wheel carries
# them as broker/static; a checkout keeps them at the top, beside templates/).
PACKAGE = Path(__file__).resolve().parent.parent
STATIC = PACKAGE / "static" if (PACKAGE / "static").is_dir() else PACKAGE.parent / "static"

# At /assets: the app keeps Flask's own /static route (to a folder the broker does not have).
bp = Blueprint("ui", __name__, static_folder=str(STATIC), static_url_path="/assets")

P = ParamSpec("P")

ONCE = "credential_once"  # the session key of the secret waiting for its one view


def login_required(view: Callable[P, ResponseReturnValue]) -> Callable[P, ResponseReturnValue]:
    @wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> ResponseReturnValue:
        g.principal = current_principal()
        if g.principal is None:
            wanted = request.full_path.rstrip("?") if request.method == "GET" else None
            return redirect(url_for("ui.index", next=safe_next(wanted)))
        return view(*args, **kwargs)

    return wrapper


# Actions that must rest on the claims the provider holds now, not on those of the login: each
# confirms them first (a refresh), so someone removed from a group cannot act on the old ones.
# Release and cancel only give something up: they go on even when the provider is unreachable.
CONFIRMED_ACTIONS = {"approve", "deny", "activate", "extend", "review"}


@bp.app_context_processor
def inject_principal() -> dict[str, object]:
    principal = current_principal()
    return {"principal": principal, "queue_size": _queue_size(principal)}


# Globals, not context: the macros that templates import see them too.
bp.add_app_template_global(words.state_label, "state_label")
bp.add_app_template_global(words.state_word, "state_word")
bp.add_app_template_global(words.short_time, "short_time")
bp.add_app_template_global(words.state_detail, "state_detail")


def _queue_size(principal: Principal | None) -> int:
    """What waits for this person: requests to decide and break-glass reviews due (for the badge
    in the navigation). A store that cannot be read leaves the badge out, not the page."""
    if principal is None:
        return 0
    try:
        grants = services().grants
        return len(grants.approval_queue(principal)) + len(_reviews_due(principal))
    except BrokerError:
        return 0


def _reviews_due(principal: Principal) -> list[Grant]:
    grants = services().grants
    return [
        grant
        for grant in grants.store.search_grants(break_glass=True, limit=200)
        if not grant.reviewed_at and grants.may_review(principal, grant)
    ]


@bp.get("/favicon.ico")
def favicon() -> Response:
    return send_from_directory(STATIC, "favicon.ico", mimetype="image/vnd.microsoft.icon")


@bp.get("/")
def index() -> ResponseReturnValue:
    principal = current_principal()
    if principal is None:
        return render_template("login.html", next=safe_next(request.args.get("next")))
    return _home(principal)


@dataclass(frozen=True)
class Offer:
    """An entitlement as the home page and the request form describe it."""

    entitlement: Entitlement
    approval: str  # "no approval" or who approves
    break_glass: bool  # this person may take it through break-glass
    may_request: bool  # this person may request it the ordinary way

    @property
    def name(self) -> str:
        return self.entitlement.name


def _approval_words(entitlement: Entitlement) -> str:
    rule = entitlement.approval
    if rule is None:
        return "no approval needed"
    groups = ", ".join(rule.each_of or rule.from_groups)
    count = f"{rule.required} approval" + ("s" if rule.required > 1 else "")
    text = f"{count} from {groups}"
    if rule.auto_approve_groups:
        text += f" (automatic for {', '.join(rule.auto_approve_groups)})"
    return text


def _offers(principal: Principal) -> list[Offer]:
    grants = services().grants
    eligible = {e.name for e in grants.eligible(principal)}
    glass = {e.name for e in grants.break_glass_eligible(principal)}
    return [
        Offer(e, _approval_words(e), e.name in glass, e.name in eligible)
        for e in grants.policy().entitlements.values()
        if e.name in eligible or e.name in glass
    ]


def _home(principal: Principal) -> str:
    grants = services().grants
    mine = grants.mine(principal)
    policy = grants.policy().entitlements
    live = [grant for grant in mine if grant.status in (ACTIVE, ISSUING)]
    waiting = [grants.describe(grant) for grant in mine if grant.status in AWAITING]
    for view in waiting:
        found = policy.get(view["entitlement"])
        view["who_approves"] = _approval_words(found) if found else ""
    past = [grant for grant in mine if grant not in live and grant.status not in AWAITING][:15]
    return render_template(
        "index.html",
        live=live,
        waiting=waiting,
        past=past,
        unverified=[grant for grant in mine if grant.status == REVOKE_FAILED],
        offers=_offers(principal),
        extendable={name for name, e in policy.items() if e.extend is not None},
    )


# --- asking ---------------------------------------------------------------------------------------

# Which field a refusal is about, so the page can put the message beside it.
FIELD_OF_CODE = {
    "invalid_duration": "duration",
    "duration_too_long": "duration",
    "reason_too_short": "reason",
    "ticket_required": "ticket",
    "ticket_mismatch": "ticket",
}


def _field_of(error: BrokerError) -> str:
    field = FIELD_OF_CODE.get(error.code, "")
    if not field and error.code == "invalid_request":
        for name in ("reason", "ticket", "public_key", "duration"):
            if error.detail.startswith(name) or f"{name} " in error.detail[:40]:
                return name
        if "key" in error.detail.lower():
            return "public_key"
    return field


def _error_text(error: BrokerError, entitlement: Entitlement | None) -> str:
    """The refusal as the page says it: a ticket's pattern is the policy's business, not words
    for people (the API still says it)."""
    if error.code in ("ticket_required", "ticket_mismatch") and entitlement is not None:
        if error.code == "ticket_required":
            return f"{entitlement.name} needs a ticket: the incident or change this is for."
        return "That ticket is not one this entitlement accepts: give the incident or change id."
    return error.detail


@bp.get("/request")
@login_required
def request_form() -> ResponseReturnValue:
    name = request.args.get("entitlement", "")
    glass = request.args.get("break_glass") == "1"
    return _request_page(g.principal, name, glass)


def _request_page(
    principal: Principal,
    name: str,
    glass: bool,
    error: BrokerError | None = None,
    form: object = None,
) -> tuple[str, int]:
    grants = services().grants
    offer = next((o for o in _offers(principal) if o.name == name), None)
    if offer is None:
        abort(404, description=f"{name or 'that'} is not an entitlement you may request.")
    glass = glass and offer.break_glass
    if not glass and not offer.may_request:
        glass = True  # only the emergency path is open to this person
    entitlement = offer.entitlement
    active = grants.store.count_open(principal.issuer, principal.subject, name, OPEN)
    policy = grants.policy()
    if glass:
        preview = policy.evaluate_break_glass(principal, name, None, "")
    else:
        preview = policy.evaluate(principal, name, None, None, None, utcnow(), active)
    agents, scopes = task_form.offers([entitlement])
    data = form if form is not None else {}
    maximum = (
        entitlement.break_glass.max_duration
        if glass and entitlement.break_glass
        else entitlement.max_duration
    )
    page = render_template(
        "request.html",
        offer=offer,
        entitlement=entitlement,
        glass=glass,
        preview=preview,
        durations=_duration_choices(maximum),
        maximum=maximum,
        agents=agents,
        scopes=scopes,
        checked=task_form.checked(data),  # type: ignore[arg-type]
        form=data,
        error=error,
        error_text=_error_text(error, entitlement) if error else "",
        error_field=_field_of(error) if error else "",
    )
    return page, error.status if error else 200


def _duration_choices(maximum: int) -> list[str]:
    steps = [300, 900, 1800, 3600, 7200, 14400, 28800]
    return [format_duration(s) for s in steps if s < maximum] + [format_duration(maximum)]


@bp.post("/requests")
@login_required
def create_request() -> ResponseReturnValue:
    g.principal = fresh_principal()  # a request, a break-glass activation: on current claims
    form = request.form
    grants = services().grants
    chosen = grants.policy().entitlements.get(form.get("entitlement") or "")
    agent, tools = task_form.asked(form, chosen)
    glass = form.get("break_glass") == "1"
    try:
        grant, credential = grants.request(
            g.principal,
            form.get("entitlement"),
            form.get("duration"),
            form.get("reason"),
            form.get("ticket", ""),
            form.get("public_key", ""),
            glass,
            agent,
            tools,
        )
    except BrokerError as exc:
        if chosen is None or not any(o.name == chosen.name for o in _offers(g.principal)):
            raise
        return _request_page(g.principal, chosen.name, glass, exc, form)
    if credential is None:
        flash(f"Requested {grant.entitlement}: waiting for approval.")
        return redirect(url_for("ui.show_request", grant_id=grant.id), 303)
    return _show_once(grant, credential)


# --- the credential, shown once -------------------------------------------------------------------


def _show_once(grant: Grant, credential: IssuedCredential) -> ResponseReturnValue:
    """Keep the new secret in the (server-side, sealed) session for one view, and send the
    browser to that view: a reload of it asks for nothing again."""
    session[ONCE] = {
        "grant_id": grant.id,
        "secret": credential.secret,
        "kind": credential.kind,
        "details": credential.details,
        "private": credential.private,
        "expires_at": credential.details.get("expires_at") or grant.window_end,
    }
    response = redirect(url_for("ui.credential", grant_id=grant.id), 303)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/requests/<grant_id>/credential")
@login_required
def credential(grant_id: str) -> Response:
    grants = services().grants
    grant = grants.get(g.principal, grant_id, owner_only=True)
    held = session.get(ONCE)
    shown = held if isinstance(held, dict) and held.get("grant_id") == grant.id else None
    if shown is not None:
        session.pop(ONCE, None)  # this is its one view
    settings = services().settings
    entitlement = grants.policy().entitlements.get(grant.entitlement)
    response = make_response(
        render_template(
            "credential.html",
            grant=grant,
            credential=shown,
            exchanges=task_form.exchanges(grant, grants.policy().tools),
            exchange_fields=task_form.exchange_fields,
            token_endpoint=settings.server["base_url"].rstrip("/") + "/oauth/token",
            vault_addr=settings.vault["addr"],
            revocable=(grants.backends.get(grant.backend) is None)
            or grants.backends[grant.backend].revocable,
            extendable=entitlement is not None and entitlement.extend is not None,
        ),
        200 if shown is not None else 410,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


# --- a grant, the queue ---------------------------------------------------------------------------


@bp.get("/requests/<grant_id>")
@login_required
def show_request(grant_id: str) -> str:
    grants = services().grants
    grant = grants.get(g.principal, grant_id)
    approvals = grants.store.approvals_of(grant.id)
    entitlement = grants.policy().entitlements.get(grant.entitlement)
    backend = grants.backends.get(grant.backend)
    return render_template(
        "grant.html",
        grant=grant,
        view=grants.describe(grant),
        steps=words.steps(grants.chain(grant.id), grant, approvals),
        mine=grant.owned_by(g.principal),
        may_review=grants.may_review(g.principal, grant) and not grant.reviewed_at,
        may_decide=grant.status == "pending"
        and any(q.id == grant.id for q in grants.approval_queue(g.principal)),
        extend=entitlement.extend if entitlement is not None else None,
        revocable=backend is None or backend.revocable,
        who_approves=_approval_words(entitlement) if entitlement else "",
    )


@bp.get("/approvals")
@login_required
def approvals() -> str:
    grants = services().grants
    policy = grants.policy().entitlements
    queue = []
    for grant in sorted(grants.approval_queue(g.principal), key=lambda q: q.created_at):
        view = grants.describe(grant)
        found = policy.get(grant.entitlement)
        view["grants"] = _what_it_grants(found) if found else ""
        view["description"] = found.description if found else ""
        view["explanation"] = _decision_reasons(grants.chain(grant.id))
        view["groups"] = _requester_groups(grants.chain(grant.id))
        queue.append(view)
    return render_template("approvals.html", queue=queue, reviews=_reviews_due(g.principal))


def _what_it_grants(entitlement: Entitlement) -> str:
    if entitlement.vault_policies:
        return f"{entitlement.backend}: Vault policies " + ", ".join(entitlement.vault_policies)
    if entitlement.task is not None:
        return "a task for " + entitlement.task.describe()
    return entitlement.backend


def _decision_reasons(chain: list[dict]) -> list[str]:
    decision = next((e for e in chain if e["type"] == "decision"), None)
    return [str(r) for r in (decision or {}).get("data", {}).get("reasons") or []]


def _requester_groups(chain: list[dict]) -> list[str]:
    asked = next((e for e in chain if e["type"] == "request"), None)
    principal = (asked or {}).get("data", {}).get("principal") or {}
    return [str(group) for group in principal.get("groups") or []]


@bp.post("/requests/<grant_id>/<action>")
@login_required
def act(grant_id: str, action: str) -> ResponseReturnValue:
    """One form post per button: approve, deny, cancel, release, review; activate and extend
    issue a new secret, shown once on the credential page."""
    grants, form = services().grants, request.form
    if action in CONFIRMED_ACTIONS:
        g.principal = fresh_principal()
    if action == "activate":
        return _show_once(*grants.activate(g.principal, grant_id, form.get("public_key", "")))
    if action == "extend":
        return _show_once(
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
    flash(
        DONE_WORDS[action].format(
            entitlement=grant.entitlement, state=words.state_label(grant.status)
        )
    )
    if action in ("approve", "deny"):
        return redirect(url_for("ui.approvals"))
    return redirect(url_for("ui.show_request", grant_id=grant.id))


DONE_WORDS = {
    "approve": "Approved {entitlement}: it is now {state}.",
    "deny": "Denied {entitlement}.",
    "cancel": "Cancelled your request for {entitlement}.",
    "release": "Released {entitlement}: it has ended; the broker now removes the credential and "
    "verifies it is gone.",
    "review": "Review recorded for {entitlement}.",
}
