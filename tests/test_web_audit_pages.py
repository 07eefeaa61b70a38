"""The auditors' review pages: grants made through the real API, browsers logged in through the
real OIDC provider, the audit chain verified (and broken on purpose) in the real database file."""

import csv
import html
import io
import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.audit.search import AuditSearch
from broker.errors import ConfigError
from broker.models import Grant, isoformat
from tests.helpers import browser, page, sqlite_only

GRANT_ROW = re.compile(r'<tr class="grant" data-grant-id="([^"]+)">')
NEXT_PAGE = re.compile(r'<a id="next-page" href="([^"]+)">')
BASE = datetime(2036, 11, 23, 10, 0, tzinfo=UTC)  # after anything the API makes in a test


def listed(text):
    return GRANT_ROW.findall(text)


def store_of(app):
    return app.extensions["jit"].grants.store


def insert(app, count=1, start=BASE, step=timedelta(minutes=1), **fields):
    """Grants written straight into the store (break-glass is not built on this branch), the
    first created at `start`, each next one `step` later. Returns them oldest first."""
    made = []
    with store_of(app).transaction() as tx:
        for i in range(count):
            created = isoformat(start + i * step)
            values = {
                "id": f"{fields.get('entitlement', 'kv-read')}-{created}-{i:04d}",
                "requester_iss": "https://idp.test",
                "requester_sub": "sub-olga",
                "requester": "olga@example.com",
                "entitlement": "kv-read",
                "reason": "inserted",
                "duration": 600,
                "status": "revoked",
                "created_at": created,
                "window_start": created,
                "window_end": isoformat(start + i * step + timedelta(minutes=10)),
                "backend": "vault_token",
                "policy_hash": "0" * 64,
                **fields,
            }
            grant = Grant(**values)
            tx.insert_grant(grant)
            made.append(grant)
    return made


def newest_first(grants):
    return [g.id for g in sorted(grants, key=lambda g: (g.created_at, g.id), reverse=True)]


def request_via_api(call, user, entitlement="kv-read", reason="INC-1 review test"):
    response = call(
        "POST",
        "/api/v1/requests",
        {"entitlement": entitlement, "duration": "10m", "reason": reason},
        user=user,
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def test_an_auditor_sees_the_grants_made_through_the_api(make_app, api_for):
    app = make_app()
    call = api_for(app)
    alices = request_via_api(call, "alice")
    bobs = request_via_api(call, "bob", "kv-admin", "CHG-9 rotate")
    assert call("POST", f"/api/v1/requests/{alices['id']}/release").status_code == 200

    auditor = browser(app, "frank")
    home = page(auditor, "/")
    assert 'href="/audit"' in home  # the navigation shows auditors the review pages
    text = page(auditor, "/audit")
    made = [store_of(app).get_grant(g["id"]) for g in (alices, bobs)]
    assert listed(text) == newest_first(made)  # (both may share a second: then by id)
    assert "alice@example.com" in text and "bob@example.com" in text
    assert "kv-admin" in text and "ended" in text  # released: "ended", as on every page
    assert f'href="/audit/grants/{alices["id"]}"' in text
    assert "next-page" not in text


def test_only_auditors_may_read_the_review_pages(make_app, api_for):
    app = make_app()
    grant = request_via_api(api_for(app), "alice")
    engineer = browser(app, "alice")
    assert 'href="/audit"' not in page(engineer, "/")
    for path in ("/audit", "/audit.csv", f"/audit/grants/{grant['id']}"):
        text = page(engineer, path, status=403)
        assert "for auditors only" in text and "auditors" in text
        assert "INC-1 review test" not in text

    anonymous = app.test_client()
    for path in ("/audit", "/audit.csv", f"/audit/grants/{grant['id']}"):
        response = anonymous.get(path)
        assert response.status_code == 302
        # to the login page, which then brings the auditor back to the page asked for
        assert parse_qs(urlsplit(response.headers["Location"]).query) == {"next": [path]}


def test_the_filters_narrow_the_list(make_app, api_for):
    app = make_app()
    call = api_for(app)
    alices = request_via_api(call, "alice")
    bobs = request_via_api(call, "bob", "kv-admin", "CHG-9 rotate")
    call("POST", f"/api/v1/requests/{alices['id']}/release")
    glass = insert(app, 2, break_glass=1, status="active", review_due="2036-11-24T10:00:00Z")
    early = insert(app, 3, start=BASE - timedelta(days=365 * 20), entitlement="kv-admin")
    auditor = browser(app, "frank")

    def ids(query):
        return set(listed(page(auditor, "/audit?" + query)))

    everything = {alices["id"], bobs["id"], *(g.id for g in glass + early)}
    assert ids("") == everything
    assert ids("person=alice@example.com") == {alices["id"]}
    assert ids("person=alice") == {alices["id"]}  # the subject works as well
    assert ids("person=sub-olga") == {g.id for g in glass + early}
    assert ids("person=nobody@example.com") == set()
    assert ids("entitlement=kv-admin") == {bobs["id"], *(g.id for g in early)}
    assert ids("status=released") == {alices["id"]}
    assert ids("status=active") == {bobs["id"], *(g.id for g in glass)}
    assert ids("break_glass=yes") == {g.id for g in glass}
    assert ids("break_glass=no") == everything - {g.id for g in glass}
    assert ids("break_glass=any") == everything
    assert ids("until=2020-01-01T00:00:00Z") == {g.id for g in early}
    # since inclusive, until exclusive: the second break-glass grant was created at BASE + 1m
    assert ids(f"since={glass[0].created_at}&until={glass[1].created_at}") == {glass[0].id}
    assert ids("since=2036-11-23T11:00:00%2B01:00&until=2036-11-23T10:01:00Z") == {glass[0].id}
    assert ids("entitlement=kv-admin&status=active") == {bobs["id"]}

    text = page(auditor, "/audit?break_glass=yes")
    assert "BREAK-GLASS" in text
    assert '<option value="yes" selected>' in text  # the form keeps what was asked
    assert '<option value="kv-admin">' in text  # the policy's entitlements are offered
    text = page(auditor, "/audit?person=%22%3E%3Cscript%3Ex()%3C/script%3E")
    assert "<script>x()" not in text and 'value="&#34;&gt;&lt;script&gt;x()' in text


def test_pages_hold_every_grant_once_in_order(make_app):
    app = make_app()
    # 120 grants, three to each second, so that the id breaks ties within one created_at
    grants = insert(app, 120, step=timedelta(seconds=1) / 3)
    assert len({g.created_at for g in grants}) == 40
    insert(app, 5, entitlement="kv-admin")
    expected = newest_first(grants)
    auditor = browser(app, "frank")

    seen, path, pages = [], "/audit?entitlement=kv-read", 0
    while path:
        text = page(auditor, path)
        rows = listed(text)
        assert len(rows) <= 50
        seen += rows
        pages += 1
        found = NEXT_PAGE.search(text)
        path = html.unescape(found.group(1)) if found else None
        if path:
            assert "entitlement=kv-read" in path and "before_id=" in path
    assert pages == 3
    assert seen == expected
    assert len(set(seen)) == 120


def test_the_timeline_shows_a_verified_chain_and_names_the_entry_someone_edited(make_app, api_for):
    app = make_app()
    call = api_for(app)
    grant = request_via_api(call, "alice", reason="<script>alert(1)</script>")
    call("POST", f"/api/v1/requests/{grant['id']}/release")
    request_via_api(call, "bob", "kv-admin", "CHG-9 later")
    audit_log = app.extensions["jit"].audit_log
    total = audit_log.store.audit_head()["seq"]
    ours = [e["seq"] for e in audit_log.store.audit_entries(grant["id"])]
    auditor = browser(app, "frank")
    # Before the background verification reaches them: the grant's own entries are checked,
    # and the page says the whole log is not yet verified that far (issue 15).
    text = page(auditor, f"/audit/grants/{grant['id']}")
    assert f"Chain verified:</strong> this grant's {len(ours)} entries are intact" in text
    assert f"Not yet verified with the whole log:</strong> {len(ours)} of them" in text
    signed = audit_log.checkpoint_and_advance()["size"]  # the reaper thread's turn

    text = page(auditor, f"/audit/grants/{grant['id']}")
    assert f"The whole log is verified through seq {total}." in text
    # this grant's entries, not the whole log's count (issue 16)
    assert f"Chain verified:</strong> this grant's {len(ours)} entries are intact" in text
    assert total > len(ours)
    if max(ours) <= signed:
        assert f"signed checkpoint (through seq {signed})" in text
    else:
        assert "Not yet signed:" in text
    assert re.findall(r'data-seq="(\d+)"', text) == [str(seq) for seq in ours]
    assert "alice@example.com" in text and "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Chain broken" not in text

    edited = ours[1]
    store_of(app).db.execute(  # behind the broker's back
        "UPDATE audit SET data = ? WHERE seq = ?", [json.dumps({"edited": True}), edited]
    )
    text = page(auditor, f"/audit/grants/{grant['id']}")
    assert "Chain verified" not in text
    assert f"Chain broken at seq {edited}:</strong>" in text
    assert f"entry {edited} was edited: its content does not match its hash" in text


def test_the_grant_page_shows_break_glass_review_and_approvals(make_app, api_for):
    app = make_app()
    (glass,) = insert(app, break_glass=1, status="active", review_due="2036-11-24T10:00:00Z")
    auditor = browser(app, "frank")
    text = page(auditor, f"/audit/grants/{glass.id}")
    assert "BREAK-GLASS" in text and "2036-11-24T10:00:00Z" in text and "not yet" in text
    assert "No entries for this grant." in text
    page(auditor, "/audit/grants/no-such-grant", status=404)


def test_the_csv_holds_every_match_and_defuses_formulas(make_app, api_for):
    app = make_app()
    call = api_for(app)
    formulas = ['=HYPERLINK("http://evil")', "+1+1", "-2+3", "@SUM(A1)"]
    made = [request_via_api(call, "alice", reason=reason)["id"] for reason in formulas]
    for grant_id in made:
        call("POST", f"/api/v1/requests/{grant_id}/release")
    request_via_api(call, "bob", "kv-admin", "CHG-9 not alice")
    inserted = insert(app, 70, requester="alice@example.com", requester_sub="alice")
    auditor = browser(app, "frank")

    response = auditor.get("/audit.csv?person=alice@example.com")
    assert response.status_code == 200
    assert response.is_streamed
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"].startswith("attachment; filename=")
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert len(rows) == 74  # more than one page
    assert [row["id"] for row in rows][:70] == newest_first(inserted)
    assert {row["requester"] for row in rows} == {"alice@example.com"}
    reasons = {row["id"]: row["reason"] for row in rows}
    assert [reasons[grant_id] for grant_id in made] == ["'" + reason for reason in formulas]
    assert "handle" not in rows[0]  # the credential's accessor stays out of the export

    assert 'href="/audit.csv?person=alice@example.com"' in page(
        auditor, "/audit?person=alice@example.com"
    )


def test_iter_grants_streams_in_batches_what_search_finds(make_app):
    app = make_app()
    insert(app, 23, step=timedelta(seconds=1) / 2)
    store = store_of(app)
    everything = store.search_grants(limit=1000)
    assert [g.id for g in store.iter_grants(batch=5)] == [g.id for g in everything]
    assert [g.id for g in store.iter_grants(batch=23)] == [g.id for g in everything]


@pytest.mark.parametrize(
    "query, message",
    [
        ("since=yesterday", "since 'yesterday' is not a UTC ISO 8601 time"),
        ("until=2026-13-01T00:00:00Z", "until '2026-13-01T00:00:00Z' is not a UTC ISO 8601 time"),
        ("since=2026-11-23T10:00:00Z&until=2026-11-23T09:00:00Z", "must be later than since"),
        ("status=on_fire", "is not a grant state"),
        ("break_glass=maybe", "break_glass must be any, yes or no"),
        ("before_at=2026-11-23T10:00:00Z", "needs both before_at and before_id"),
        ("before_at=soon&before_id=x", "before_at 'soon' is not a UTC ISO 8601 time"),
    ],
)
def test_a_bad_filter_is_a_400_that_says_why(make_app, query, message):
    app = make_app()
    auditor = browser(app, "frank")
    assert message in html.unescape(page(auditor, "/audit?" + query, status=400))
    if not query.startswith("before"):
        response = auditor.get("/audit.csv?" + query)
        assert response.status_code == 400 and message in html.unescape(response.get_data(True))


FILTERS = {
    "person": {"person": "alice@example.com"},
    "entitlement": {"entitlement": "kv-read"},
    "status": {"status": "active"},
    "break_glass yes": {"break_glass": True},
    "break_glass no": {"break_glass": False},
    "since": {"since": "2026-11-23T10:00:00Z"},
    "until": {"until": "2026-11-23T10:00:00Z"},
    "page cursor": {"before": ("2026-11-23T10:00:00Z", "some-id")},
}


@sqlite_only  # SQLite's query plans; PostgreSQL has the same indexes (one schema)
@pytest.mark.parametrize("name", FILTERS)
def test_every_filter_is_served_by_an_index(make_app, name):
    store = store_of(make_app())
    statements = []
    store.db.conn.set_trace_callback(statements.append)
    try:
        store.search_grants(**FILTERS[name])
    finally:
        store.db.conn.set_trace_callback(None)
    (select,) = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = [row["detail"] for row in store.db.execute("EXPLAIN QUERY PLAN " + select)]
    touching = [step for step in plan if " grants" in step]
    assert touching, plan
    for step in touching:
        assert step.startswith("SEARCH grants USING INDEX idx_grants_"), plan


@sqlite_only
def test_with_no_filter_the_newest_come_from_the_created_at_index(make_app):
    store = store_of(make_app())
    statements = []
    store.db.conn.set_trace_callback(statements.append)
    try:
        store.search_grants()
    finally:
        store.db.conn.set_trace_callback(None)
    (select,) = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    plan = [row["detail"] for row in store.db.execute("EXPLAIN QUERY PLAN " + select)]
    assert "SCAN grants USING INDEX idx_grants_created_at" in plan, plan


def test_auditor_groups_must_be_a_list(make_app):
    audit_log = make_app().extensions["jit"].audit_log
    with pytest.raises(ConfigError, match="must be a list"):
        AuditSearch(audit_log, "auditors")
