"""The auditors' pages: every grant, filtered, newest first; one grant with its verified
timeline; a CSV export. GET only, read only, auditors only (`[audit] auditor_groups`). Thin: the
filters are parsed and the rows read by `broker.audit.search`."""

from __future__ import annotations

from flask import Blueprint, Response, g, render_template, request

from ..audit.search import PAGE_SIZE, STATUSES, GrantFilter, parse_cursor
from ..models import isoformat, utcnow
from . import services
from .auth import current_principal
from .ui import login_required

bp = Blueprint("audit_pages", __name__)


@bp.app_context_processor
def inject_is_auditor() -> dict[str, bool]:
    return {"is_auditor": services().audit_search.is_auditor(current_principal())}


def _auditor_only() -> None:
    services().audit_search.require_auditor(g.principal)


@bp.get("/audit")
@login_required
def search() -> str:
    _auditor_only()
    audit_search = services().audit_search
    grant_filter = GrantFilter.parse(request.args)
    before = parse_cursor(request.args.get("before_at", ""), request.args.get("before_id", ""))
    page = audit_search.search(grant_filter, before, PAGE_SIZE)
    return render_template(
        "audit_list.html",
        page=page,
        grant_filter=grant_filter,
        filter_args=grant_filter.as_args(),
        paged=before is not None,
        statuses=STATUSES,
        entitlements=sorted(services().policy.current().entitlements),
    )


@bp.get("/audit.csv")
@login_required
def export() -> Response:
    _auditor_only()
    grant_filter = GrantFilter.parse(request.args)  # a bad filter is a 400 before any row is sent
    rows = services().audit_search.export_csv(grant_filter)
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
def show_grant(grant_id: str) -> str:
    _auditor_only()
    found = services().audit_search.grant(grant_id)
    return render_template(
        "audit_grant.html",
        grant=found.grant,
        approvals=found.approvals,
        entries=found.timeline.entries,
        verification=found.timeline.verification,
    )
