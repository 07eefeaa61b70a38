"""The UI in a real browser (issue 16): Debian's Chromium driven by Playwright, logging in through
the real OIDC provider's form, against a live broker with approvals, extension and break-glass.
On every page visited: axe-core finds nothing critical or serious, nothing is refused by the
Content-Security-Policy, and at 390 px wide the page never scrolls sideways. The tests read what a
person sees (text, roles, labels). A failing test saves a screenshot (its path is printed);
JIT_SCREENSHOTS=DIR saves every page at 1280 and 390 px for a person to look at."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import token_works, wait_for_status

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

ROOT = Path(__file__).resolve().parent
AXE = ROOT / "browser" / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = os.environ.get("JIT_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = os.environ.get("JIT_SCREENSHOTS", "")
WIDE, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/setup installs Debian's chromium")
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Person:
    """One person's browser (a context of its own: its own cookies) and what it saw."""

    def __init__(self, browser, broker, username, request):
        self.broker, self.username, self.request = broker, username, request
        self.context = browser.new_context(viewport=WIDE, accept_downloads=True)
        self.page = self.context.new_page()
        self.refused: list[str] = []  # what the Content-Security-Policy blocked
        self.page.on(
            "console",
            lambda message: (
                self.refused.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )

    def open(self, path):
        """Go to `path`; when the broker asks to log in, log in at the provider's form."""
        self.page.goto(self.broker.url + path)
        login = self.page.get_by_role("link", name="Log in with your organisation's identity")
        if self.page.url.startswith(self.broker.url) and login.count():
            login.click()
            self.page.get_by_label("Username").fill(self.username)
            self.page.get_by_label("Password").fill("demo")
            self.page.get_by_role("button", name="Sign in").click()
            consent = self.page.get_by_role("button", name="Continue")
            self.page.wait_for_load_state()
            if consent.count():
                consent.click()
            self.page.wait_for_url(self.broker.url + "/**")
        return self.page

    def look(self, name):
        """The checks every page passes: accessibility, CSP, no sideways scrolling at 390 px."""
        page = self.page
        assert self.refused == [], f"the CSP refused something on {name}: {self.refused}"
        page.evaluate(AXE.read_text())
        found = page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".filter(v => v.impact === 'critical' || v.impact === 'serious')"
            ".map(v => v.id + ': ' + v.help + ' @ ' + v.nodes.map(n => n.target).join(' | '))"
        )
        assert found == [], f"axe on {name} ({page.url}): {found}"
        self.refused.clear()  # axe may try inline styles of its own
        if SHOTS:
            page.screenshot(path=f"{SHOTS}/{name}-1280.png", full_page=True)
        page.set_viewport_size(PHONE)
        try:
            wide = page.evaluate("document.documentElement.scrollWidth")
            if SHOTS:
                page.screenshot(path=f"{SHOTS}/{name}-390.png", full_page=True)
            assert wide <= PHONE["width"], f"{name} is {wide} px wide at 390 px"
        finally:
            page.set_viewport_size(WIDE)

    def close(self):
        report = getattr(self.request.node, "rep_call", None)
        if report is not None and report.failed:
            shot = self.request.node.path.parent / ".." / ".pytest_cache"
            shot = Path(os.environ.get("JIT_FAILED_SCREENSHOTS", "")) or shot
            target = self.request.config._tmp_path_factory.getbasetemp() / (  # noqa: SLF001
                f"{self.request.node.name}-{self.username}.png"
            )
            self.page.screenshot(path=str(target), full_page=True)
            print(f"\nscreenshot of {self.username}'s page: {target}")  # noqa: T201
        self.context.close()


@pytest.fixture
def people(chromium, ui_broker, request):
    made: dict[str, Person] = {}

    def person(username):
        if username not in made:
            made[username] = Person(chromium, ui_broker, username, request)
        return made[username]

    yield person
    for someone in made.values():
        someone.close()


def grant_id_of(page):
    return re.search(r"/requests/([^/?#]+)", page.url).group(1)


def test_alice_asks_bob_approves_alice_uses_and_releases_frank_audits(people, ui_broker, openbao):
    alice = people("alice")
    page = alice.open("/")
    expect(page).to_have_title(re.compile("My access"))
    expect(page.get_by_role("heading", name="What I may request")).to_be_visible()
    alice.look("home")

    page.get_by_role("link", name="Request db-admin").click()
    expect(page.get_by_role("heading", name="Request db-admin")).to_be_visible()
    expect(page.get_by_label("Ticket")).to_be_visible()  # this entitlement asks for one
    expect(page.get_by_label("SSH public key")).to_have_count(0)  # and for no key
    alice.look("request-form")
    page.get_by_label("How long").fill("3h")
    page.get_by_label("Reason").fill("INC-42 reindex the orders table")
    page.get_by_label("Ticket").fill("INC-42")
    page.get_by_role("button", name="Ask for approval").click()
    expect(page.get_by_label("How long")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_text("longer than the maximum 1h")).to_be_visible()  # beside the field
    alice.look("request-form-error")
    page.get_by_label("How long").fill("20m")
    page.get_by_role("button", name="Ask for approval").click()
    expect(page.get_by_text("waiting for approval").first).to_be_visible()
    grant_id = grant_id_of(page)
    alice.look("grant-pending")

    bob = people("bob")
    queue = bob.open("/approvals")  # logged in, and back on the page asked for
    assert queue.url == ui_broker.url + "/approvals"
    expect(queue.get_by_role("link", name=re.compile(r"Approvals\s+1"))).to_be_visible()
    card = queue.locator(f"#q-{grant_id}")
    expect(card).to_contain_text("alice@example.com asks for db-admin")
    expect(card).to_contain_text("INC-42")
    expect(card).to_contain_text("engineers")  # the requester's groups
    bob.look("approvals")
    card.get_by_label("Your reason").fill("fine for INC-42")
    card.get_by_role("button", name="Approve").click()
    expect(queue.get_by_role("status").first).to_contain_text("Approved db-admin")
    expect(queue.get_by_text("No request waits for your approval.")).to_be_visible()

    page = alice.open(f"/requests/{grant_id}")
    page.get_by_role("button", name="Activate now: show the credential").click()
    expect(page.get_by_text("Shown once.")).to_be_visible()
    secret = page.locator("#credential").inner_text().strip()
    assert token_works(openbao, secret)
    expect(page.locator("pre#snippet")).to_contain_text(f"VAULT_TOKEN='{secret}'")
    expect(page.locator("pre#snippet")).to_contain_text("export VAULT_ADDR=")
    expect(page.get_by_role("button", name="Copy the token")).to_be_visible()
    expect(page.locator(".countdown").first).to_have_text(re.compile(r"\d+m \d\ds left"))
    alice.look("credential")
    page.reload()  # a reload asks for nothing again, and shows the secret no more
    expect(page.get_by_text("Already shown.")).to_be_visible()
    assert secret not in page.content()
    page.get_by_role("button", name=re.compile("Release now")).click()
    expect(page.get_by_role("status").first).to_contain_text("Released db-admin")
    wait_for_status(ui_broker.grants, grant_id, "revoked")
    assert not token_works(openbao, secret)

    frank = people("frank")
    page = frank.open("/audit")
    page.get_by_label("Person").fill("alice@example.com")
    page.get_by_label("Entitlement").fill("db-admin")
    page.get_by_label("State").select_option(label="ended")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#grants tbody tr")
    expect(rows).to_have_count(1)
    frank.look("audit-list")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all matches as CSV").click()
    exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert [row["id"] for row in exported] == [grant_id]
    page.get_by_role("link", name=re.compile("^Timeline")).click()
    expect(page.get_by_text("Chain verified:")).to_be_visible()
    timeline = page.locator("#timeline")
    for step in ("Requested", "Policy decision: allowed", "Approved", "Credential issued",
                 "Released by the requester", "Revoked", "Removal verified"):  # fmt: skip
        expect(timeline.get_by_text(step, exact=True).first).to_be_visible()

    def step(title):
        return timeline.locator("li.entry", has=page.get_by_text(title, exact=True))

    expect(step("Policy decision: allowed").first).to_contain_text("by the broker (policy")
    expect(step("Approved").first).to_contain_text("by bob@example.com")
    frank.look("audit-grant")
    page.get_by_role("link", name="Dashboard").click()
    expect(page.get_by_role("img", name="Grants per day by entitlement")).to_be_visible()
    frank.look("dashboard")


def test_break_glass_is_loud_and_its_review_has_no_preselected_outcome(people, ui_broker):
    alice = people("alice")
    page = alice.open("/")
    page.get_by_role("link", name="Break glass for prod-fix").click()
    expect(page.get_by_text("Emergency access, without approval.")).to_be_visible()
    expect(page.get_by_text("the security channel at once")).to_be_visible()  # who is told
    alice.look("break-glass-form")
    page.get_by_label("Reason").fill("INC-77 payments are down")
    page.get_by_role("button", name="Break glass now").click()
    expect(page).to_have_url(re.compile("/request"))  # the confirmation is required
    page.get_by_label(re.compile("I confirm this is an emergency")).check()
    page.get_by_role("button", name="Break glass now").click()
    expect(page.get_by_text("Shown once.")).to_be_visible()
    grant_id = grant_id_of(page)

    dave = people("dave")
    queue = dave.open("/approvals")
    expect(queue.get_by_role("heading", name=re.compile("Break-glass reviews due"))).to_be_visible()
    dave.look("approvals-reviews")
    queue.locator(".card", has_text="alice@example.com: prod-fix").get_by_role(
        "link", name="Review it"
    ).first.click()
    expect(queue.get_by_text("Break-glass grant:")).to_be_visible()
    justified = queue.get_by_role("radio", name=re.compile("Justified"))
    unjustified = queue.get_by_role("radio", name=re.compile("Unjustified"))
    assert not justified.is_checked() and not unjustified.is_checked()
    dave.look("break-glass-review")
    justified.check()
    queue.get_by_label("Notes").fill("confirmed outage INC-77")
    queue.get_by_role("button", name="Record the review").click()
    expect(queue.get_by_text("Reviewed by dave@example.com")).to_be_visible()

    page = alice.open(f"/requests/{grant_id}")
    page.get_by_role("button", name=re.compile("Release now")).click()
    expect(page.get_by_role("status").first).to_contain_text("Released prod-fix")


def test_someone_who_may_not_approve_sees_no_button_and_a_forged_post_is_refused(people, ui_broker):
    alice = people("alice")
    page = alice.open("/request?entitlement=db-admin")
    page.get_by_label("Reason").fill("CHG-9 rotate the keys")
    page.get_by_label("Ticket").fill("CHG-9")
    page.get_by_role("button", name="Ask for approval").click()
    grant_id = grant_id_of(page)

    carol = people("carol")
    page = carol.open("/approvals")
    expect(page.get_by_text("No request waits for your approval.")).to_be_visible()
    expect(page.get_by_role("button", name="Approve")).to_have_count(0)
    carol.look("approvals-empty")
    token = page.locator("input[name=csrf_token]").first.get_attribute("value")
    forged = carol.context.request.post(
        f"{ui_broker.url}/requests/{grant_id}/approve",
        form={"csrf_token": token, "reason": "let me"},
        max_redirects=0,
    )
    assert forged.status in (403, 404), forged.status
    assert ui_broker.grants.store.get_grant(grant_id).status == "pending"
    page = carol.open("/audit")  # an error page: readable, with a way back
    expect(page.get_by_role("alert")).to_contain_text("for auditors only")
    expect(page.get_by_role("link", name=re.compile("^Back"))).to_be_visible()
    carol.look("error-403")

    page = alice.open(f"/requests/{grant_id}")
    page.get_by_role("button", name="Cancel request").click()


def test_the_login_page_and_the_icon(people, ui_broker):
    stranger = people("nobody")
    stranger.page.goto(ui_broker.url + "/")
    expect(stranger.page.get_by_role("main")).to_contain_text("Nobody here holds standing")
    stranger.look("login")
    assert requests.get(ui_broker.url + "/favicon.ico", timeout=10).status_code == 200
    evil = requests.get(
        ui_broker.url + "/auth/login?next=//evil.example/x", allow_redirects=False, timeout=10
    )
    assert evil.status_code == 302 and "evil.example" not in evil.headers["Location"]


def test_the_dashboard_before_its_first_count_says_so_and_its_link_shows_the_charts(
    people, ui_broker
):
    """The live broker's figures held uncounted (a KeptFigures of the test's own in its place, its
    count waiting): the page says they are being counted, passes the checks, and its reload link
    shows the charts once the count is let go."""
    from broker.audit.kept_figures import KeptFigures

    services = ui_broker.app.extensions["jit"]
    own, release = services.dashboard, threading.Event()

    def held_count(now):
        release.wait(30)
        return own._count(now)

    held = services.dashboard = KeptFigures(held_count)
    held.start()
    try:
        frank = people("frank")
        page = frank.open("/audit/dashboard")
        expect(page.get_by_role("status")).to_contain_text("The figures are being counted.")
        expect(page.get_by_role("img", name="Grants per day by entitlement")).to_have_count(0)
        frank.look("dashboard-counting")
        release.set()
        deadline = time.monotonic() + 10
        while held.get() is None:
            assert time.monotonic() < deadline, "the released count never landed"
            time.sleep(0.05)
        page.get_by_role("link", name="Reload the dashboard").click()
        expect(page.get_by_role("img", name="Grants per day by entitlement")).to_be_visible()
    finally:
        release.set()
        services.dashboard = own
        held.close()
