"""The JSON API under /api/v1, authenticated by a bearer JWT from the OIDC provider."""

from __future__ import annotations

from flask import Blueprint, g, jsonify, request

from ..errors import InvalidRequest, Unauthenticated
from ..models import IssuedCredential
from . import services

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.before_request
def authenticate():
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send Authorization: Bearer <access token from the OIDC provider>")
    g.principal = services().verifier.verify(token.strip())


@bp.get("/entitlements")
def entitlements():
    eligible = services().grants.eligible(g.principal)
    return {
        "entitlements": [
            {"name": e.name, "description": e.description, "max_duration": e.max_duration}
            for e in eligible
        ]
    }


@bp.post("/requests")
def create_request():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object with entitlement, duration, reason")
    grant, credential = services().grants.request(
        g.principal, body.get("entitlement"), body.get("duration"), body.get("reason")
    )
    response = jsonify(dict(grant.as_json(), credential=credential_json(credential)))
    response.status_code = 201
    response.headers["Location"] = f"/api/v1/requests/{grant.id}"
    response.headers["Cache-Control"] = "no-store"  # the secret must not sit in a cache
    return response


@bp.get("/requests")
def list_requests():
    # Until approvers exist (a later issue) everyone sees only their own; mine=1 says so.
    return {"requests": [grant.as_json() for grant in services().grants.mine(g.principal)]}


@bp.get("/requests/<grant_id>")
def get_request(grant_id: str):
    return services().grants.get(g.principal, grant_id).as_json()


@bp.post("/requests/<grant_id>/release")
def release(grant_id: str):
    return services().grants.release(g.principal, grant_id).as_json()


def credential_json(credential: IssuedCredential) -> dict:
    return {
        "type": credential.kind,
        "token": credential.secret,
        "expires_at": credential.details.get("expires_at"),
        "policies": credential.details.get("policies", []),
    }
