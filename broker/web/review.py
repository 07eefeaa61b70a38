"""The auditors' review pages: every grant, filtered, newest first; one grant with its verified
timeline; a CSV export. GET only, read only, auditors only (`[audit] auditor_groups`). Thin: the
filters are parsed and the rows read by `broker.review`."""

from __future__ import annotations

from flask import Blueprint, Response, g, render_template, request

from ..models import isoformat, utcnow
from ..review import PAGE_SIZE, STATUSES, GrantFilter, parse_cursor
from . import services
from .auth import current_principal
from .ui import login_required

bp = Blueprint("review", __name__)


@bp.app_context_processor
def inject_is_auditor():
    return {"is_auditor": services().review.is_auditor(current_principal())}


def _auditor_only():
    services().review.require_auditor(g.principal)


@bp.get("/audit")
@login_required
def search():
    _auditor_only()
    review = services().review
    grant_filter = GrantFilter.parse(request.args)
    before = parse_cursor(request.args.get("before_at", ""), request.args.get("before_id", ""))
    page = review.search(grant_filter, before, PAGE_SIZE)
    return render_template(
        "review.html",
        page=page,
        grant_filter=grant_filter,
        filter_args=grant_filter.as_args(),
        paged=before is not None,
        statuses=STATUSES,
        entitlements=sorted(services().policy.current().entitlements),
    )


@bp.get("/audit.csv")
@login_required
def export():
    _auditor_only()
    grant_filter = GrantFilter.parse(request.args)  # a bad filter is a 400 before any row is sent
    rows = services().review.export_csv(grant_filter)
    stamp = isoformat(utcnow()).replace(":", "").replace("-", "")
    return Response(
        rows,
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="jit-grants-{stamp}.csv"',
            "Cache-Control": "no-store",
        },
    )


@bp.get("/audit/grants/<grant_id>")
@login_required
def show_grant(grant_id: str):
    _auditor_only()
    found = services().review.grant(grant_id)
    return render_template(
        "review_grant.html",
        grant=found.grant,
        approvals=found.approvals,
        entries=found.timeline.entries,
        verification=found.timeline.verification,
    )
