"""The JSON API under /api/v1, authenticated by a bearer JWT from the OIDC provider."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from ..backends.database import database_options
from ..errors import InvalidRequest, Unauthenticated
from ..models import Grant, IssuedCredential
from ..policy import Entitlement
from . import services
from .json_body import json_object

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.before_request
def authenticate() -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send Authorization: Bearer <access token from the OIDC provider>")
    g.principal = services().verifier.verify(token.strip())


@bp.get("/me")
def me() -> dict[str, object]:
    """Who the broker takes the caller to be: what `jit whoami` shows."""
    principal = g.principal
    return {
        "issuer": principal.issuer,
        "subject": principal.subject,
        "kind": principal.kind,
        "name": principal.name,
        "email": principal.email,
        "email_verified": principal.email_verified,
        "groups": list(principal.groups),
        "client_id": principal.client_id,
    }


@bp.get("/entitlements")
def entitlements() -> dict[str, object]:
    """What the caller may request; all=1 adds what they may not, with the policy's reason."""
    grants = services().grants
    break_glass = {e.name for e in grants.break_glass_eligible(g.principal)}
    listed: list[dict[str, object]] = [
        {**_entitlement_json(e), "eligible": True, "break_glass": e.name in break_glass}
        for e in grants.eligible(g.principal)
    ]
    if request.args.get("all") == "1":
        listed += [
            {**_entitlement_json(e), "eligible": False, "break_glass": e.name in break_glass,
             "why_not": why}
            for e, why in grants.not_eligible(g.principal)
        ]  # fmt: skip
    return {"entitlements": listed}


def _entitlement_json(entitlement: Entitlement) -> dict[str, object]:
    approval = entitlement.approval
    return {
        "name": entitlement.name,
        "description": entitlement.description,
        "backend": entitlement.backend,
        "max_duration": entitlement.max_duration,
        "default_duration": entitlement.default_duration,
        "approval": {
            "required": approval.required,
            "rule": approval.describe(),
            "auto_approve_groups": list(approval.auto_approve_groups),
        }
        if approval
        else None,
        "ticket_required": entitlement.reason.ticket is not None,
        "extendable": entitlement.extend is not None,
    }


@bp.post("/requests")
def create_request() -> Response:
    body = json_object(
        "entitlement, duration, reason (and ticket where the policy asks; public_key for an "
        "SSH certificate; break_glass: true for the emergency path; agent and tools "
        "{name: [scopes]} for a task grant for an agent)"
    )
    grant, credential = services().grants.request(
        g.principal,
        body.get("entitlement"),
        body.get("duration"),
        body.get("reason"),
        body.get("ticket", ""),
        body.get("public_key", ""),
        body.get("break_glass", False),
        body.get("agent"),
        body.get("tools"),
    )
    response = _with_credential(grant, credential)
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/requests/{grant.id}"
    return response


@bp.get("/requests")
def list_requests() -> dict[str, object]:
    """mine=1 (the default): your own; pending_approval=1: what you may approve now."""
    grants = services().grants
    if request.args.get("pending_approval") == "1":
        found = grants.approval_queue(g.principal)
    else:
        found = grants.mine(g.principal)
    return {"requests": [grants.describe(grant) for grant in found]}


@bp.get("/requests/<grant_id>")
def get_request(grant_id: str) -> dict[str, object]:
    grants = services().grants
    return grants.describe(grants.get(g.principal, grant_id))


@bp.get("/requests/<grant_id>/chain")
def chain(grant_id: str) -> dict[str, object]:
    """The grant's audit chain in brief (seq, time, type, actor), for whoever may see the grant:
    what `jit show` prints. The entries' data stays with the auditors."""
    grants = services().grants
    grant = grants.get(g.principal, grant_id)
    return {
        "entries": [
            {
                "seq": entry["seq"],
                "at": entry["at"],
                "type": entry["type"],
                "actor": entry["actor"].get("sub", ""),
            }
            for entry in grants.chain(grant.id)
        ]
    }


@bp.post("/requests/<grant_id>/approve")
def approve(grant_id: str) -> dict[str, object]:
    body = json_object("an optional reason", required=False)
    grants = services().grants
    return grants.describe(grants.approve(g.principal, grant_id, body.get("reason", "")))


@bp.post("/requests/<grant_id>/deny")
def deny(grant_id: str) -> dict[str, object]:
    body = json_object("reason")
    grants = services().grants
    return grants.describe(grants.deny(g.principal, grant_id, body.get("reason")))


@bp.post("/requests/<grant_id>/review")
def review(grant_id: str) -> dict[str, object]:
    """A break-glass grant's mandatory review: outcome justified|unjustified, and notes."""
    body = json_object("outcome (justified or unjustified) and notes")
    grants = services().grants
    return grants.describe(
        grants.review(g.principal, grant_id, body.get("outcome"), body.get("notes"))
    )


@bp.post("/requests/<grant_id>/cancel")
def cancel(grant_id: str) -> dict[str, object]:
    grants = services().grants
    return grants.describe(grants.cancel(g.principal, grant_id))


@bp.post("/requests/<grant_id>/activate")
def activate(grant_id: str) -> Response:
    """Issue an approved request: the credential is shown here, once, to the requester."""
    body = json_object("public_key for an SSH certificate", required=False)
    return _with_credential(
        *services().grants.activate(g.principal, grant_id, body.get("public_key", ""))
    )


@bp.post("/requests/<grant_id>/extend")
def extend(grant_id: str) -> Response:
    """A longer window means a new credential, shown here once; the old one is revoked."""
    body = json_object("duration: how much longer (and public_key for an SSH certificate)")
    return _with_credential(
        *services().grants.extend(
            g.principal, grant_id, body.get("duration"), body.get("public_key", "")
        )
    )


@bp.post("/requests/<grant_id>/release")
def release(grant_id: str) -> dict[str, object]:
    """`?wait=verified`: answer once the credential is verified gone (status `revoked`), rather
    than at once (`released`, the reaper removing it)."""
    wait = request.args.get("wait")
    if wait not in (None, "verified"):
        raise InvalidRequest("wait may only be 'verified'")
    grants = services().grants
    return grants.describe(grants.release(g.principal, grant_id, wait=wait == "verified"))


def _with_credential(grant: Grant, credential: IssuedCredential | None) -> Response:
    grants = services().grants
    view = grants.describe(grant)
    if credential is not None:
        view["credential"] = credential_json(credential)
        options = grants.policy().entitlements.get(grant.entitlement)
        database = database_options(options) if options else None
        if database is not None:
            view["credential"].update(database.connection())
    response = jsonify(view)
    response.headers["Cache-Control"] = "no-store"  # the secret must not sit in a cache
    return response


def credential_json(credential: IssuedCredential) -> dict:
    if credential.kind == "database":
        return {
            "type": credential.kind,
            "username": credential.private.get("username"),
            "password": credential.secret,
            "expires_at": credential.details.get("expires_at"),
        }
    if credential.kind == "tool_task":
        return {
            "type": credential.kind,
            "subject_token": credential.secret,
            "subject_token_type": credential.details.get("token_type"),
            "expires_at": credential.details.get("expires_at"),
        }
    if credential.kind == "ssh":
        return {
            "type": credential.kind,
            "certificate": credential.secret,
            "valid_principals": credential.details.get("valid_principals", []),
            "valid_before": credential.details.get("valid_before"),
            "revocable": False,
        }
    return {
        "type": credential.kind,
        "token": credential.secret,
        "expires_at": credential.details.get("expires_at"),
        "policies": credential.details.get("policies", []),
    }
