"""The auditors' pages: every grant, filtered, newest first; one grant with its timeline and this
grant's verification; CSV and JSON-lines exports; a dashboard of charts. GET only, read only,
auditors only (`[audit] auditor_groups`). Thin: the filters are parsed and the rows read by
`broker.audit.search`, the figures counted by `broker.audit.dashboard`, drawn by `charts`."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, g, render_template, request

from ..audit import dashboard as figures_of
from ..audit.search import PAGE_SIZE, STATE_WORDS, WORD_LABELS, GrantFilter, parse_cursor
from ..models import isoformat, utcnow
from . import charts, services, words
from .auth import current_principal
from .ui import login_required

bp = Blueprint("audit_pages", __name__)


@bp.app_context_processor
def inject_is_auditor() -> dict[str, bool]:
    try:
        return {"is_auditor": services().audit_search.is_auditor(current_principal())}
    except Exception:  # noqa: BLE001 - an error page must render even when the session cannot
        return {"is_auditor": False}


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
        statuses=[(word, WORD_LABELS[word]) for word in STATE_WORDS],
        entitlements=sorted(services().policy.current().entitlements),
    )


def _download(rows: Iterator[str], mimetype: str, extension: str) -> Response:
    stamp = isoformat(utcnow()).replace(":", "").replace("-", "")
    return Response(
        rows,
        mimetype=mimetype,
        headers={
            "Content-Disposition": f'attachment; filename="jit-grants-{stamp}.{extension}"',
            "Cache-Control": "no-store",
        },
    )


@bp.get("/audit.csv")
@login_required
def export() -> Response:
    _auditor_only()
    grant_filter = GrantFilter.parse(request.args)  # a bad filter is a 400 before any row is sent
    return _download(services().audit_search.export_csv(grant_filter), "text/csv", "csv")


@bp.get("/audit.jsonl")
@login_required
def export_jsonl() -> Response:
    _auditor_only()
    grant_filter = GrantFilter.parse(request.args)
    rows = services().audit_search.export_jsonl(grant_filter)
    return _download(rows, "application/x-ndjson", "jsonl")


@bp.get("/audit/grants/<grant_id>")
@login_required
def show_grant(grant_id: str) -> str:
    _auditor_only()
    found = services().audit_search.grant(grant_id)
    verification = found.timeline.verification
    entries = found.timeline.entries
    seqs = [entry["seq"] for entry in entries]
    unsigned = [seq for seq in seqs if seq > verification.signed_size]
    # The whole log is verified in the background up to a mark; past it, only entry by entry.
    unverified = [seq for seq in seqs if seq > verification.last_seq]
    return render_template(
        "audit_grant.html",
        grant=found.grant,
        approvals=found.approvals,
        entries=entries,
        steps=words.steps(entries, found.grant, found.approvals),
        verification=verification,
        unsigned=unsigned,
        unverified=unverified,
        review=next((e for e in entries if e["type"] == "review"), None),
        checkpoint_every=services().settings.audit["checkpoint_every"],
    )


@bp.get("/audit/dashboard")
@login_required
def dashboard() -> str:
    _auditor_only()
    found, last_failure = services().dashboard.shown()  # at once: counted in the background
    if found is None:  # the first count is still running (or failed, and runs again)
        return render_template(
            "dashboard_counting.html", days=figures_of.DAYS, last_failure=last_failure
        )
    return render_template(
        "dashboard.html",
        figures=found,
        last_failure=last_failure,
        days=figures_of.DAYS,
        per_day=charts.bars_per_day(
            "per-day", "Grants per day by entitlement", found.days, found.grants_per_day
        ),
        series=list(found.grants_per_day),
        approve=charts.histogram("approve", "Time to approve", found.approve_seconds),
        glass=charts.bars_per_day(
            "glass",
            "Break-glass uses per day",
            found.days,
            {"break-glass": found.break_glass_per_day},
        ),
        lag=charts.histogram(
            "lag", "Revocation lag: window end to removal verified", found.revocation_lag_seconds
        ),
        failed=charts.bars_per_day(
            "failed",
            "Failed removals per day",
            found.days,
            {"failed removals": found.failed_removals_per_day},
        ),
    )
