"""The policy language: every rule alone and together, requester matching, schedules in several
zones, limits, approvals, extensions, and every problem `check` reports with its line. Pure: no
services, fixed clocks."""

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from broker.backends import POLICY_KINDS
from broker.backends.database import DatabaseOptions, database_options
from broker.backends.ssh import SshOptions, ssh_options
from broker.errors import ConfigError
from broker.models import Approval, Principal
from broker.policy import PolicyError, check_policy_text, explain, load_policy

POLICY = r"""
[approver_groups]
known = ["security", "dba"]

[entitlements.read]
description = "Read production"
vault_policies = ["prod-read"]
max_duration = "1h"

[entitlements.read.requesters]
groups = ["engineers", "sre"]

[entitlements.db]
description = "Administer the production database"
backend = "vault_token"
vault_policies = ["prod-db-admin"]
max_duration = "2h"
default_duration = "30m"
max_active = 1

[entitlements.db.requesters]
groups = ["sre", "dba"]
email_domains = ["example.com"]
claims = { name = "Root Beer", groups = ["platform"] }
agents = ["ci-agent"]

[entitlements.db.reason]
min_length = 10
ticket = '^(INC|CHG)-\d+$'  # a TOML literal string: no escaping

[entitlements.db.approval]
required = 2
from_groups = ["security", "dba"]
each_of = ["security", "dba"]
expires_after = "4h"
auto_approve_groups = ["oncall"]

[entitlements.db.extend]
max_step = "30m"
max_total = "4h"

[entitlements.one-key]
vault_policies = ["p"]
max_duration = "1h"
requesters = { groups = ["engineers"] }
approval = { required = 1, from_groups = ["security"] }

[entitlements.three-keys]
vault_policies = ["p"]
max_duration = "1h"
requesters = { groups = ["engineers"] }
approval = { required = 3, from_groups = ["security", "dba"], each_of = ["security", "dba"] }

[entitlements.office]
vault_policies = ["p"]
max_duration = "4h"
requesters = { groups = ["engineers"] }
extend = { max_step = "1h", max_total = "10h" }

[entitlements.office.schedule]
timezone = "Europe/Berlin"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "08:00-18:00"

[entitlements.night]
vault_policies = ["p"]
max_duration = "10h"
requesters = { groups = ["engineers"] }
schedule = { timezone = "UTC", days = ["fri"], hours = "22:00-06:00" }

[entitlements.tokyo]
vault_policies = ["p"]
max_duration = "10h"
requesters = { groups = ["engineers"] }
schedule = { timezone = "Asia/Tokyo", days = ["mon"], hours = "09:00-17:00" }

[entitlements.always]
vault_policies = ["p"]
max_duration = "72h"
requesters = { groups = ["engineers"] }
schedule = { timezone = "America/New_York" }

[entitlements.bot]
vault_policies = ["p"]
max_duration = "15m"
default_duration = "10m"
requesters = { agents = ["ci-agent", "agent-sub-7"] }
"""

ISS = "https://idp"
ALICE = Principal(ISS, "alice", name="Alice", email="alice@corp.test", groups=("engineers",))
SAM = Principal(ISS, "sam", email="sam@corp.test", groups=("sre",))
ONCALL = Principal(ISS, "olga", email="olga@corp.test", groups=("sre", "oncall"))
MAILED = Principal(ISS, "mia", email="Mia@Example.com")
NAMED = Principal(ISS, "rb", name="Root Beer", email="rb@corp.test")
LISTED = Principal(ISS, "lu", email="lu@corp.test", groups=("platform", "x"))
NOBODY = Principal(ISS, "carol", email="carol@corp.test", groups=("contractors",))
AGENT = Principal(ISS, "ci-agent", kind="agent", client_id="ci-agent")
AGENT_BY_SUB = Principal(ISS, "agent-sub-7", kind="agent", client_id="other-client")
# An agent carrying a group and an email that would admit a person: never admitted by them.
AGENT_IN_GROUPS = Principal(
    ISS, "deployer", kind="agent", client_id="deployer", email="d@example.com", groups=("sre",)
)
# A person whose subject is an agent's name: never admitted by the agent list.
HUMAN_NAMED_AGENT = Principal(ISS, "ci-agent", client_id="ci-agent")
DEAVER = Principal(ISS, "dave", email="dave@corp.test", groups=("security",))
ERIN = Principal(ISS, "erin", email="erin@corp.test", groups=("security", "dba"))
DORA = Principal(ISS, "dora", email="dora@corp.test", groups=("dba",))

MON_NOON = datetime(2026, 1, 5, 11, 0, tzinfo=UTC)  # Monday 12:00 in Berlin (CET)
GOOD = {"reason": "INC-7 fix the index", "ticket": "INC-7", "now": MON_NOON}


@pytest.fixture(scope="module")
def policy():
    found, problems = check_policy_text(POLICY, POLICY_KINDS)
    assert problems == []
    return found


def approval(who: Principal) -> Approval:
    return Approval(who.issuer, who.subject, who.display, who.groups, "2026-01-05T11:00:00Z")


# --- requesters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "entitlement", "admitted", "why"),
    [
        (SAM, "db", True, "member of sre"),
        (MAILED, "db", True, "email address at example.com"),
        (NAMED, "db", True, "claim name is Root Beer"),
        (LISTED, "db", True, "claim groups is platform"),  # a list claim containing the value
        (AGENT, "db", True, "agent ci-agent is listed"),
        (AGENT_BY_SUB, "bot", True, "agent agent-sub-7 is listed"),
        (ALICE, "db", False, "db admits members of sre, dba; email addresses at example.com"),
        (NOBODY, "read", False, "carol@corp.test is in contractors"),
        (AGENT_IN_GROUPS, "db", False, "db admits only the agents ci-agent; not deployer"),
        (AGENT_IN_GROUPS, "read", False, "read admits no agents; deployer is an agent"),
        (HUMAN_NAMED_AGENT, "db", False, "db admits members of"),
        (HUMAN_NAMED_AGENT, "bot", False, "bot admits only the agents ci-agent, agent-sub-7"),
        (AGENT, "read", False, "read admits no agents"),
        (Principal(ISS, "x", kind="robot", groups=("sre",)), "db", False, "db admits"),
    ],
)
def test_requester_rules(policy, principal, entitlement, admitted, why):
    decision = policy.evaluate(principal, entitlement, 600, reason=None, ticket=None, now=MON_NOON)
    assert decision.allowed is admitted
    assert decision.error == ("" if admitted else "not_eligible")
    assert why in decision.reasons[0]
    assert (entitlement in [e.name for e in policy.eligible(principal)]) is admitted


def test_eligible_lists_only_admitting_entitlements(policy):
    assert [e.name for e in policy.eligible(SAM)] == ["read", "db"]
    assert [e.name for e in policy.eligible(AGENT)] == ["db", "bot"]
    assert policy.eligible(NOBODY) == []


# --- every rule alone, then together --------------------------------------------------------------


@pytest.mark.parametrize(
    ("entitlement", "principal", "asked", "error", "message"),
    [
        ("nope", SAM, {}, "unknown_entitlement", "no entitlement named 'nope' in the policy"),
        ("db", NOBODY, {}, "not_eligible", "db admits members of sre, dba"),
        (
            "db",
            SAM,
            {"duration": 7201},
            "duration_too_long",
            "2h1s is longer than the maximum 2h for db",
        ),
        ("read", SAM, {"duration": None}, "invalid_duration", "read has no default"),
        ("read", SAM, {"duration": 0}, "invalid_duration", "longer than zero"),
        ("db", SAM, {"reason": "too short"}, "reason_too_short", "at least 10 characters"),
        ("db", SAM, {"ticket": ""}, "ticket_required", r"needs a ticket matching ^(INC|CHG)-\d+$"),
        ("db", SAM, {"ticket": "ABC-1"}, "ticket_mismatch", r"ticket ABC-1 does not match"),
        ("db", SAM, {"ticket": "INC-1x"}, "ticket_mismatch", "INC-1x"),  # fullmatch, not search
        ("db", SAM, {"active": 1}, "limit_reached", "you already hold 1 active or pending db"),
        (
            "office",
            ALICE,
            {"now": datetime(2026, 1, 10, 9, 0, tzinfo=UTC)},
            "outside_schedule",
            "office may be active mon-fri 08:00-18:00 Europe/Berlin; it is sat 10:00 there",
        ),
    ],
)
def test_each_rule_refuses_alone_with_its_code(
    policy, entitlement, principal, asked, error, message
):
    request = {**GOOD, "duration": 1800, **asked}
    duration = request.pop("duration")
    decision = policy.evaluate(principal, entitlement, duration, **request)
    assert (decision.allowed, decision.error) == (False, error)
    assert len(decision.reasons) == 1
    assert message in decision.reasons[0]


def test_every_failing_rule_is_reported_and_the_first_names_the_error(policy):
    decision = policy.evaluate(
        NOBODY, "db", 3 * 3600, reason="short", ticket="X", now=MON_NOON, active=3
    )
    assert decision.error == "not_eligible"
    expected = [
        "db admits members of",
        "3h is longer",
        "at least 10",
        "does not match",
        "limit is 1",
    ]
    assert len(decision.reasons) == len(expected)
    for text, part in zip(decision.reasons, expected, strict=True):
        assert part in text


def test_a_refusal_still_names_who_would_approve(policy):
    decision = policy.evaluate(SAM, "db", 600, reason="short", ticket="INC-1", now=MON_NOON)
    assert decision.error == "reason_too_short"
    assert (decision.approvals_required, decision.approvers) == (2, ("security", "dba"))


def test_eligible_but_too_long_and_reason_too_short_gives_both(policy):
    decision = policy.evaluate(SAM, "db", 3 * 3600, reason="short", ticket="INC-1", now=MON_NOON)
    assert decision.error == "duration_too_long"
    assert decision.reasons == (
        "3h is longer than the maximum 2h for db",
        "reason must be at least 10 characters (it has 5)",
    )


def test_an_allowed_decision_says_why_for_each_rule(policy):
    decision = policy.evaluate(SAM, "db", 3600, **GOOD)
    assert decision.allowed and decision.error == ""
    assert decision.reasons == (
        "member of sre",
        "1h within the maximum 2h",
        "reason of at least 10 characters given",
        r"ticket INC-7 matches ^(INC|CHG)-\d+$",
        "0 open db grants, below the limit of 1",
        "needs 2 approvals from members of security or dba, at least one from each of "
        "security, dba",
    )
    assert decision.duration == 3600
    assert decision.policy_hash == hashlib.sha256(POLICY.encode()).hexdigest()


def test_the_positional_call_of_grants_still_works(policy):
    decision = policy.evaluate(ALICE, "read", 1800)
    assert decision.allowed
    assert decision.reasons == (
        "member of engineers",
        "30m within the maximum 1h",
        "no approval needed: issued at once",
    )


@pytest.mark.parametrize(
    ("duration", "seconds", "text"),
    [
        (None, 1800, "no duration given: the default 30m applies, within the maximum 2h"),
        (600, 600, "10m within the maximum 2h"),
    ],
)
def test_default_duration(policy, duration, seconds, text):
    decision = policy.evaluate(SAM, "db", duration, **GOOD)
    assert decision.allowed and decision.duration == seconds
    assert decision.reasons[1] == text


def test_reason_and_ticket_left_out_are_not_checked(policy):
    assert policy.evaluate(SAM, "db", 600, reason=None, ticket=None, now=MON_NOON).allowed


# --- schedules ------------------------------------------------------------------------------------


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize(
    ("entitlement", "now", "allowed", "text"),
    [
        ("office", at(2026, 1, 5, 9, 0), True, "it is mon 10:00 there"),  # CET, UTC+1
        ("office", at(2026, 1, 5, 6, 59), False, "it is mon 07:59 there"),
        ("office", at(2026, 1, 5, 7, 0), True, "mon 08:00"),  # the start is inside
        ("office", at(2026, 1, 5, 16, 59), True, "mon 17:59"),
        ("office", at(2026, 1, 5, 17, 0), False, "it is mon 18:00 there"),  # the end is not
        ("office", at(2026, 7, 6, 6, 30), True, "mon 08:30"),  # CEST, UTC+2
        ("office", at(2026, 1, 5, 6, 30), False, "mon 07:30"),  # the same UTC time in winter
        ("office", at(2026, 1, 11, 10, 0), False, "it is sun 11:00 there"),
        ("night", at(2026, 1, 9, 23, 0), True, "fri 23:00"),
        ("night", at(2026, 1, 10, 3, 0), True, "sat 03:00"),  # Friday's slot, after midnight
        ("night", at(2026, 1, 10, 6, 0), False, "sat 06:00"),
        ("night", at(2026, 1, 9, 3, 0), False, "fri 03:00"),  # Thursday's slot: not listed
        ("night", at(2026, 1, 8, 23, 0), False, "thu 23:00"),
        ("tokyo", at(2026, 1, 5, 0, 30), True, "mon 09:30"),  # still Monday 00:30 in UTC
        ("tokyo", at(2026, 1, 4, 23, 30), False, "it is mon 08:30 there"),  # Sunday in UTC
        ("tokyo", at(2026, 1, 5, 9, 0), False, "mon 18:00"),  # Monday in UTC, evening in Tokyo
        ("always", at(2026, 1, 10, 3, 0), True, "every day 00:00-24:00 America/New_York"),
    ],
)
def test_schedules_in_their_own_zone(policy, entitlement, now, allowed, text):
    decision = policy.evaluate(ALICE, entitlement, 600, now=now)
    assert decision.allowed is allowed
    assert decision.error == ("" if allowed else "outside_schedule")
    assert any(text in reason for reason in decision.reasons), decision.reasons


@pytest.mark.parametrize(
    ("entitlement", "start", "duration", "end"),
    [
        ("office", at(2026, 1, 5, 15, 0), 3600, at(2026, 1, 5, 16, 0)),  # inside: untouched
        ("office", at(2026, 1, 5, 16, 0), 4 * 3600, at(2026, 1, 5, 17, 0)),  # cut at 18:00 CET
        ("office", at(2026, 7, 6, 15, 0), 4 * 3600, at(2026, 7, 6, 16, 0)),  # 18:00 CEST
        ("office", at(2026, 1, 10, 9, 0), 3600, at(2026, 1, 10, 9, 0)),  # outside: empty
        ("night", at(2026, 1, 10, 1, 0), 10 * 3600, at(2026, 1, 10, 6, 0)),
        ("night", at(2026, 1, 9, 22, 0), 3600, at(2026, 1, 9, 23, 0)),
        ("always", at(2026, 1, 10, 3, 0), 72 * 3600, at(2026, 1, 13, 3, 0)),  # never cut at 0:00
        ("read", at(2026, 1, 10, 9, 0), 3600, at(2026, 1, 10, 10, 0)),  # no schedule
    ],
)
def test_window_end_never_runs_past_the_slot(policy, entitlement, start, duration, end):
    assert policy.window_end(entitlement, start, duration) == end


def test_an_allowed_window_that_will_be_cut_says_so(policy):
    decision = policy.evaluate(ALICE, "office", 4 * 3600, now=at(2026, 1, 5, 16, 0))
    assert decision.allowed
    assert "the window will end at mon 18:00, where the slot ends" in decision.reasons[-2]


# --- limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entitlement", "active", "allowed"),
    [("db", 0, True), ("db", 1, False), ("db", 5, False), ("read", 50, True)],
)
def test_open_grants_count_against_max_active(policy, entitlement, active, allowed):
    decision = policy.evaluate(SAM, entitlement, 600, active=active, **GOOD)
    assert decision.allowed is allowed
    if not allowed:
        assert decision.error == "limit_reached"
        assert decision.reasons == (
            f"you already hold {active} active or pending db "
            f"{'grant' if active == 1 else 'grants'}; the limit is 1",
        )


# --- approvals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "entitlement", "required", "auto", "approvers"),
    [
        (SAM, "db", 2, "", ("security", "dba")),
        (ONCALL, "db", 0, "requester is in auto-approve group oncall", ()),
        (AGENT, "db", 2, "", ("security", "dba")),  # agents are never auto-approved by group
        (ALICE, "one-key", 1, "", ("security",)),
        (ALICE, "read", 0, "", ()),
    ],
)
def test_approvals_required_by_the_decision(
    policy, principal, entitlement, required, auto, approvers
):
    decision = policy.evaluate(principal, entitlement, 600, **GOOD)
    assert decision.allowed
    assert decision.approvals_required == required
    assert decision.auto_approved == auto
    assert decision.approvers == approvers
    if auto:
        assert decision.reasons[-1] == f"auto-approved: {auto}"


def test_the_auto_approve_group_must_match_the_agent_too():
    text = POLICY.replace('auto_approve_groups = ["oncall"]', 'auto_approve_groups = ["sre"]')
    found, _ = check_policy_text(text, POLICY_KINDS)
    agent_in_sre = Principal(ISS, "ci-agent", kind="agent", client_id="ci-agent", groups=("sre",))
    assert found.evaluate(agent_in_sre, "db", 600, **GOOD).approvals_required == 2
    assert found.evaluate(SAM, "db", 600, **GOOD).approvals_required == 0


@pytest.mark.parametrize(
    ("entitlement", "approver", "requester", "given", "code", "text"),
    [
        ("db", DEAVER, SAM, [], None, ""),
        ("db", ERIN, SAM, [SAM], None, ""),
        ("db", AGENT, SAM, [], "agent_cannot_approve", "an agent cannot approve"),
        (
            "db",
            Principal(ISS, "bot2", kind="agent", groups=("security",)),
            SAM,
            [],
            "agent_cannot_approve",
            "security or dba",
        ),
        ("db", ERIN, ERIN, [], "self_approval", "you cannot approve your own request"),
        ("db", SAM, SAM, [], "self_approval", "your own request"),  # self comes before outsider
        (
            "db",
            ALICE,
            SAM,
            [],
            "not_an_approver",
            "approvals for db come from members of security or dba; you are in engineers",
        ),
        ("db", DEAVER, SAM, [DEAVER], "already_approved", "you have already approved"),
        ("read", DEAVER, SAM, [], "no_approval_needed", "read needs no approval"),
        ("gone", DEAVER, SAM, [], "unknown_entitlement", "gone is no longer in the policy"),
    ],
)
def test_who_may_approve(policy, entitlement, approver, requester, given, code, text):
    refusal = policy.check_approver(
        entitlement, approver, requester.person, [approval(p) for p in given]
    )
    if code is None:
        assert refusal is None
    else:
        assert refusal.code == code and text in refusal.message


def test_the_same_subject_from_another_issuer_is_not_the_requester(policy):
    other = Principal("https://other-idp", "sam", groups=("security",))
    assert policy.check_approver("db", other, SAM.person, []) is None


@pytest.mark.parametrize(
    ("approver", "code"),
    [
        # Another account of Sam's: his verified address, written in other case.
        (Principal(ISS, "sam-2", email="Sam@Corp.Test", email_verified=True), "self_approval"),
        # Claims Sam's address, unverified: proves nothing, so someone else.
        (Principal(ISS, "sam-3", email="sam@corp.test"), None),
        (
            Principal("https://other-idp", "x", email="sam@corp.test", email_verified=True),
            "self_approval",
        ),  # fmt: skip
        (Principal(ISS, "sam-4", email="", email_verified=True), None),
    ],
)
def test_the_requester_is_a_person_not_an_account(policy, approver, code):
    sam = Principal(ISS, "sam", email="sam@corp.test", groups=("sre",), email_verified=True)
    approver = replace(approver, groups=("security",))
    refusal = policy.check_approver("db", approver, sam.person, [])
    assert (refusal.code if refusal else None) == code
    # And once someone approved, their other identities have approved too.
    deaver = Principal(ISS, "deaver", email="DEAVER@corp.test", email_verified=True)
    again = Principal(ISS, "deaver-2", email="deaver@corp.test", email_verified=True,
                      groups=("security",))  # fmt: skip
    given = Approval(ISS, "deaver", "d", ("security",), "t", email=deaver.person.email)
    assert policy.check_approver("db", again, sam.person, [given]).code == "already_approved"
    # Counted twice, Deaver's two accounts would stand for both groups.
    same = Approval(ISS, "deaver-2", "d2", ("security", "dba"), "t", email=again.person.email)
    other = Approval(ISS, "erin", "e", ("dba",), "t", email="erin@corp.test")
    assert policy.approval_progress("db", [given, same]) == (False, ["one approval from dba"])
    assert policy.approval_progress("db", [given, same, other]) == (True, [])


FRANK = Principal(ISS, "frank", email="frank@corp.test", groups=("security",))
OUTSIDER = Principal(ISS, "otto", groups=("engineers",))


@pytest.mark.parametrize(
    ("entitlement", "given", "satisfied", "missing"),
    [
        ("one-key", [], False, ["1 more approval"]),
        ("one-key", [DEAVER], True, []),
        ("one-key", [OUTSIDER], False, ["1 more approval"]),  # not in from_groups: not counted
        ("db", [], False, ["one approval from security", "one approval from dba"]),
        ("db", [DEAVER], False, ["one approval from dba"]),
        ("db", [ERIN], False, ["one approval from dba"]),  # one person stands for one group
        ("db", [ERIN, ERIN], False, ["one approval from dba"]),  # a person counts once
        ("db", [DEAVER, FRANK], False, ["one approval from dba"]),  # two, but no dba
        ("db", [ERIN, DEAVER], True, []),  # erin for dba, dave for security
        ("db", [DEAVER, ERIN], True, []),
        ("db", [DORA, ERIN], True, []),
        ("db", [DEAVER, FRANK, DORA], True, []),
        (
            "three-keys",
            [],
            False,
            ["one approval from security", "one approval from dba", "1 more approval"],
        ),
        ("three-keys", [DEAVER, FRANK], False, ["one approval from dba"]),
        ("three-keys", [DEAVER, DORA], False, ["1 more approval"]),
        ("three-keys", [DEAVER, DORA, ERIN], True, []),
        ("read", [], True, []),
    ],
)
def test_approval_progress(policy, entitlement, given, satisfied, missing):
    assert policy.approval_progress(entitlement, [approval(p) for p in given]) == (
        satisfied,
        missing,
    )


def test_request_ttl_comes_from_expires_after(policy):
    assert policy.entitlements["db"].request_ttl == 4 * 3600
    assert policy.entitlements["one-key"].request_ttl is None
    assert policy.entitlements["read"].request_ttl is None


# --- extensions -----------------------------------------------------------------------------------

START = at(2026, 1, 5, 9, 0)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("entitlement", "principal", "window", "extra", "now", "error", "text"),
    [
        ("db", SAM, (START, START + HOUR), 1800, START, "", "30m within the step of 30m"),
        ("db", SAM, (START, START + 4 * HOUR), 60, START, "extension_too_long", "at most 4h"),
        (
            "db",
            SAM,
            (START, START + HOUR),
            3600,
            START,
            "extension_too_long",
            "an extension of db adds at most 30m; 1h asked",
        ),
        ("db", NOBODY, (START, START + HOUR), 600, START, "not_eligible", "db admits"),
        ("db", SAM, (START, START + HOUR), 0, START, "invalid_duration", "longer than zero"),
        (
            "read",
            SAM,
            (START, START + HOUR),
            600,
            START,
            "extension_not_allowed",
            "read windows cannot be extended",
        ),
        (
            "office",
            ALICE,
            (START, at(2026, 1, 5, 16, 0)),
            3600,
            at(2026, 1, 5, 15, 0),
            "",
            "stays inside the schedule",
        ),
        (
            "office",
            ALICE,
            (START, at(2026, 1, 5, 16, 30)),
            3600,
            at(2026, 1, 5, 16, 0),
            "outside_schedule",
            "may not run past mon 18:00",
        ),
        (
            "office",
            ALICE,
            (at(2026, 1, 10, 9, 0), at(2026, 1, 10, 10, 0)),
            600,
            at(2026, 1, 10, 9, 30),
            "outside_schedule",
            "it is sat 10:30 there",
        ),
        ("nope", ALICE, (START, START), 600, START, "unknown_entitlement", "no entitlement named"),
    ],
)
def test_extension_rules(policy, entitlement, principal, window, extra, now, error, text):
    decision = policy.evaluate_extension(principal, entitlement, *window, extra, now)
    assert decision.allowed is (error == "")
    assert decision.error == error
    assert decision.duration == extra
    assert (decision.approvals_required, decision.approvers) == (0, ())
    assert any(text in reason for reason in decision.reasons), decision.reasons


# --- explain --------------------------------------------------------------------------------------


def test_explain_an_allowed_request_with_approvers(policy):
    text = explain(policy, SAM, "db", None, MON_NOON)
    lines = text.splitlines()
    assert lines[0] == "db for sam@corp.test (human, groups: sre): allowed after 2 approvals"
    assert "  + member of sre" in lines
    assert "  ? a reason of at least 10 characters is required" in lines
    assert r"  ? a ticket matching ^(INC|CHG)-\d+$ is required" in lines
    assert lines[-1] == (
        "approval: 2 approvals from members of security or dba, at least one from each of "
        "security, dba; members of oncall are auto-approved; a request expires unapproved after 4h"
    )


def test_explain_a_refusal_names_every_reason(policy):
    text = explain(policy, NOBODY, "db", 3 * 3600, MON_NOON, reason="x", ticket="INC-1")
    lines = text.splitlines()
    assert lines[0].endswith(": refused (not_eligible)")
    assert [line[:4] for line in lines[1:4]] == ["  - "] * 3
    assert lines[-1].startswith("approval: 2 approvals")


@pytest.mark.parametrize(
    ("principal", "entitlement", "first"),
    [
        (
            ALICE,
            "read",
            "read for alice@corp.test (human, groups: engineers): allowed, issued at once",
        ),
        (
            ONCALL,
            "db",
            "db for olga@corp.test (human, groups: sre, oncall): allowed, auto-approved",
        ),
        (AGENT, "bot", "bot for ci-agent (agent): allowed, issued at once"),
        (ALICE, "nope", "nope for alice@corp.test (human, groups: engineers): refused"),
    ],
)
def test_explain_first_line(policy, principal, entitlement, first):
    text = explain(policy, principal, entitlement, 60, MON_NOON)
    assert text.splitlines()[0].startswith(first)


# --- loading and checking -------------------------------------------------------------------------

BASE = """[entitlements.x]
vault_policies = ["p"]
max_duration = "1h"

[entitlements.x.requesters]
groups = ["a"]
"""


def sub(old: str, new: str) -> str:
    return BASE.replace(old, new)


def add(section: str, body: str) -> str:
    """BASE and one more table: its header is line 7, its first key line 8."""
    return BASE + f"[entitlements.x.{section}]\n{body}\n"


KNOWN = "[approver_groups]\nknown = ['security']\n"
LONG = 'max_duration = "1h"'
# A database entitlement: the same lines as BASE, with the backend on line 2.
DB = sub('vault_policies = ["p"]', 'backend = "database"')


def db(body: str) -> str:
    """DB and its [database] table: the header is line 7, its first key line 8."""
    return DB + f"[entitlements.x.database]\n{body}\n"


SSH = sub('vault_policies = ["p"]', 'backend = "ssh"')


def ssh(body: str) -> str:
    """SSH and its [ssh] table: the header is line 7, its first key line 8."""
    return SSH + f"[entitlements.x.ssh]\n{body}\n"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[people]\nx = 1\n" + BASE, 1, "unknown key 'people' (known: entitlements, approver_"),
        ("colour = 'red'\n" + BASE, 1, "unknown key 'colour'"),
        (sub(LONG, LONG + '\ncolour = "red"'), 4, "x: unknown key 'colour'"),
        (sub(LONG, 'max_duraton = "1h"'), 3, "did you mean 'max_duration'?"),
        (BASE + "email_domain = ['example.com']\n", 7, "did you mean 'email_domains'?"),
        (add("reason", "minimum = 3"), 8, "x: reason: unknown key 'minimum'"),
        (add("reasons", "min_length = 3"), 7, "x: unknown key 'reasons'; did you mean 'reason'?"),
        (sub('"1h"', '"forever"'), 3, "x: max_duration: cannot read duration 'forever'"),
        (sub(LONG, ""), 1, "x: max_duration is missing"),
        (sub(LONG, LONG + "\ndefault_duration = '2h'"), 4, "default_duration 2h is longer than"),
        (sub(LONG, LONG + "\nmax_active = 0"), 4, "max_active must be a whole number"),
        (sub('["p"]', '["p", "root"]'), 2, "x: the root policy is never granted"),
        (sub('["p"]', '[" Root"]'), 2, "x: the root policy is never granted"),
        (sub('["p"]', '"p"'), 2, "x: vault_policies must be a list of names"),
        (sub('["p"]', "[]"), 2, "vault_policies must name at least one policy"),
        (
            sub('["p"]', '["p"]\nbackend = "ftp"'),
            3,
            "unknown backend 'ftp' (known: database, ssh, tool_task, vault_token)",
        ),
        (sub('groups = ["a"]', "groups = []"), 5, "x has no requesters"),
        (sub('[entitlements.x.requesters]\ngroups = ["a"]', ""), 1, "x has no requesters"),
        (sub('groups = ["a"]', 'groups = "a"'), 6, "requesters.groups must be a list of names"),
        (BASE + "email_domains = ['@example.com']\n", 7, "email domain '@example.com' must be"),
        (BASE + "claims = { department = 3 }\n", 7, "claim department must be text"),
        (add("reason", "ticket = '(INC'"), 8, "ticket pattern '(INC' does not compile"),
        (add("reason", "min_length = -1"), 8, "reason.min_length must be a whole number"),
        (add("schedule", "timezone = 'Mars/Olympus'"), 8, "unknown timezone 'Mars/Olympus'"),
        (add("schedule", "days = ['monday']"), 8, "unknown day 'monday'"),
        (add("schedule", "days = []"), 8, "schedule.days must be a list"),
        (add("schedule", "hours = '8-18'"), 8, "hours '8-18' must be HH:MM-HH:MM"),
        (add("schedule", "hours = '08:00-25:00'"), 8, "hours '08:00-25:00' must be"),
        (add("schedule", "hours = '08:00-08:00'"), 8, "not empty"),
        (add("approval", "required = 0\nfrom_groups = ['s']"), 8, "required must be at least 1"),
        (add("approval", "required = 1"), 7, "x: approval needs from_groups"),
        (add("approval", "from_groups = []"), 8, "x: approval needs from_groups"),
        (
            add("approval", "required = 1\nfrom_groups = ['s', 'd']\neach_of = ['s', 'd']"),
            10,
            "each_of lists 2 groups but only 1 approval is required, so it can never be met",
        ),
        (
            add("approval", "required = 2\nfrom_groups = ['s']\neach_of = ['s', 'd']"),
            10,
            "x: each_of names d, not in from_groups",
        ),
        (
            add("approval", "from_groups = ['s']\nexpires_after = 'soon'"),
            9,
            "x: approval: expires_after: cannot read duration 'soon'",
        ),
        (
            KNOWN + add("approval", "from_groups = ['secuirty']"),
            10,
            "x: approver group 'secuirty' is not in [approver_groups] known",
        ),
        ("[approver_groups]\nknow = ['s']\n" + BASE, 2, "approver_groups: unknown key 'know'"),
        (add("extend", "max_step = '10m'"), 7, "x: extend: max_total is missing"),
        (
            add("extend", "max_step = '10m'\nmax_total = '30m'"),
            9,
            "x: extend.max_total 30m is shorter than max_duration 1h",
        ),
        (
            BASE.replace("entitlements.x", 'entitlements."x y"'),
            1,
            "entitlement name 'x y' may hold only letters, digits",
        ),
        ("[entitlements]\n", 1, "the policy defines no entitlements"),
        ("", None, "the policy defines no entitlements"),
        ("[entitlements.x\n", 1, "not valid TOML"),
        (sub('groups = ["a"]', 'groups = ["a"'), None, "not valid TOML: Unclosed array"),
        # inline and dotted tables are found by the key that holds them
        (
            sub('[entitlements.x.requesters]\ngroups = ["a"]', "requesters = { groups = [1] }"),
            5,
            "requesters.groups must be a list",
        ),
        (sub(LONG, LONG + '\nschedule.days = ["someday"]'), 4, "unknown day 'someday'"),
        ('[[entitlements.x.requesters]]\ngroups = ["a"]', 1, "x: max_duration is missing"),
        ('[[entitlements.x.requesters]]\ngroups = ["a"]', 1, "x: requesters must be a table"),
        # database entitlements
        (DB, 1, "x: a database entitlement needs [entitlements.x.database] with role"),
        (db("mount = 'db'"), 7, "x: database.role is missing"),
        (db("role = 'ro'\nmoutn = 'db'"), 9, "x: database: unknown key 'moutn'; did you mean"),
        (db("role = 'ro/creds'"), 8, "x: database.role 'ro/creds' must be a role name"),
        (db("role = ''"), 8, "x: database.role '' must be a role name"),
        (db("role = 'ro'\nmount = '../sys'"), 9, "x: database.mount '../sys' must be a mount"),
        (db("role = 'ro'\nconnect = 'db:5432'"), 9, "x: database.connect 'db:5432' must be a"),
        (db("role = 'ro'\nconnect = 'postgresql://u:p@db/app'"), 9, "x: database.connect"),
        (db("role = 'ro'\nconnect = 5432"), 9, "x: database.connect 5432 must be a URL"),
        (add("database", "role = 'ro'"), 7, 'a [database] table needs backend = "database"'),
        (DB.replace(LONG, LONG + "\ndatabase = 'ro'"), 4, "x: database must be a table"),
        (
            DB.replace(LONG, LONG + "\ndatabase = { role = 1 }"),
            4,
            "x: database.role 1 must be a role name",
        ),
        (
            db("role = 'ro'").replace("backend", 'vault_policies = ["p"]\nbackend'),
            2,
            "x: vault_policies has no effect on a database entitlement",
        ),
        # ssh entitlements
        (SSH, 1, "x: an ssh entitlement needs [entitlements.x.ssh] with role"),
        (ssh("principals = ['deploy']"), 7, "x: ssh.role is missing"),
        (ssh("role = 'jit-users'"), 7, "x: ssh.principals is missing"),
        (ssh("role = 'u'\nprincipals = []"), 9, "x: ssh.principals must name at least one"),
        (ssh("role = 'u'\nprincipals = 'deploy'"), 9, "x: ssh.principals must be a list"),
        (ssh("role = 'u'\nprincipals = ['a,b']"), 9, "x: ssh principal 'a,b' may hold no"),
        (ssh("role = 'u/x'\nprincipals = ['a']"), 8, "x: ssh.role 'u/x' must be a role name"),
        (ssh("role = 'u'\nprincipals = ['a']\nmount = '../sys'"), 10, "x: ssh.mount '../sys'"),
        (ssh("role = 'u'\nprincipals = ['a']\nttl = 1"), 10, "x: ssh: unknown key 'ttl'"),
        (add("ssh", "role = 'u'"), 7, 'an [ssh] table needs backend = "ssh"'),
        (
            ssh("role = 'u'\nprincipals = ['a']").replace(
                "backend", 'vault_policies = ["p"]\nbackend'
            ),
            2,
            "x: vault_policies has no effect on an ssh entitlement",
        ),
    ],
)
def test_check_names_each_problem_with_its_line(text, line, message):
    found, problems = check_policy_text(text, POLICY_KINDS)
    assert found is None
    assert any(p.line == line and message in p.message for p in problems), problems


def test_a_database_entitlement_names_its_role_and_needs_no_vault_policies():
    found, problems = check_policy_text(db("role = 'readonly'") + DB_ON_ITS_OWN_MOUNT, POLICY_KINDS)
    assert problems == []
    plain, mounted = found.entitlements["x"], found.entitlements["y"]
    assert (plain.backend, plain.vault_policies) == ("database", ())
    assert database_options(plain) == DatabaseOptions("readonly", "database")
    assert database_options(mounted) == DatabaseOptions("ro", "db/prod")
    assert database_options(check_policy_text(BASE, POLICY_KINDS)[0].entitlements["x"]) is None


def test_an_ssh_entitlement_names_its_role_and_principals():
    found, problems = check_policy_text(
        ssh("role = 'jit-users'\nprincipals = ['deploy', 'alice']\nmount = 'ssh/prod'"),
        POLICY_KINDS,
    )
    assert problems == []
    chosen = found.entitlements["x"]
    assert (chosen.backend, chosen.vault_policies, database_options(chosen)) == ("ssh", (), None)
    assert ssh_options(chosen) == SshOptions("jit-users", ("deploy", "alice"), "ssh/prod")
    assert ssh_options(check_policy_text(BASE, POLICY_KINDS)[0].entitlements["x"]) is None


DB_ON_ITS_OWN_MOUNT = """
[entitlements.y]
backend = "database"
max_duration = "1h"
requesters = { groups = ["a"] }
database = { role = "ro", mount = "db/prod" }
"""


def test_check_reports_every_problem_in_line_order(tmp_path):
    text = (
        "[entitlements.a]\n"  # 1
        'vault_policies = ["root"]\n'  # 2
        'max_duration = "forever"\n'  # 3
        "[entitlements.a.requesters]\n"  # 4
        "grups = ['sre']\n"  # 5
        "[entitlements.a.schedule]\n"  # 6
        "timezone = 'Nowhere/Land'\n"  # 7
        "days = ['mon', 'funday']\n"  # 8
    )
    found, problems = check_policy_text(text, POLICY_KINDS)
    assert found is None
    assert [p.line for p in problems] == [2, 3, 4, 5, 7, 8]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path, POLICY_KINDS)
    assert isinstance(caught.value, ConfigError)
    assert caught.value.problems == problems
    lines = str(caught.value).splitlines()
    assert len(lines) == 6
    assert lines[0] == f"{path}:2: a: the root policy is never granted"
    assert lines[3] == f"{path}:5: a: requesters: unknown key 'grups'; did you mean 'groups'?"


def test_a_missing_file_is_one_problem_without_a_line(tmp_path):
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "none.toml", POLICY_KINDS)
    assert str(caught.value) == f"{tmp_path / 'none.toml'}: cannot read: No such file or directory"


def test_version_is_the_sha256_of_the_file_and_changes_with_it(tmp_path, policy):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    loaded = load_policy(path, POLICY_KINDS)
    assert loaded.version == hashlib.sha256(path.read_bytes()).hexdigest() == policy.version
    path.write_text(POLICY + "\n# reviewed\n")
    assert load_policy(path, POLICY_KINDS).version != policy.version


def test_the_example_policy_and_the_readme_policy_are_valid():
    from pathlib import Path

    root = Path(__file__).parent.parent
    example = load_policy(root / "scripts" / "example" / "policy.toml", POLICY_KINDS)
    assert set(example.entitlements) == {
        "app-secrets-read",
        "app-secrets-admin",
        "ci-deploy-read",
        "app-db-readonly",
        "deploy-ssh",
        "triage-task",
    }
    assert example.tools["github"].scopes == ("issues:read", "issues:write")
    assert example.entitlements["app-secrets-admin"].break_glass.reviewers == ("security",)
    readme = (root / "README.md").read_text()
    start = readme.index("[approver_groups]")
    found, problems = check_policy_text(readme[start : readme.index("```", start)], POLICY_KINDS)
    assert problems == [] and list(found.entitlements) == ["prod-db-admin"]


def test_a_claims_rule_matches_any_claim_the_provider_vouched_for():
    policy, problems = check_policy_text(
        "[entitlements.x]\nvault_policies = ['p']\nmax_duration = '1h'\n"
        "[entitlements.x.requesters]\nclaims = { department = 'eng', teams = 'db' }\n",
        POLICY_KINDS,
    )
    assert problems == []
    engineer = Principal("i", "s", extra=(("department", "eng"),))
    in_team = Principal("i", "t", extra=(("teams", ("web", "db")),))
    outsider = Principal("i", "u", extra=(("department", "sales"),))
    assert policy.evaluate(engineer, "x", 60).allowed
    assert policy.evaluate(in_team, "x", 60).allowed
    assert policy.evaluate(outsider, "x", 60).error == "not_eligible"


def test_a_database_entitlement_may_say_where_people_connect():
    text = db("role = 'readonly'\nconnect = 'postgresql://db.internal:6432/app'")
    found, problems = check_policy_text(text, POLICY_KINDS)
    assert problems == []
    options = database_options(found.entitlements["x"])
    assert options.connection() == {"host": "db.internal", "port": 6432, "dbname": "app"}
    assert DatabaseOptions("ro").connection() == {}
