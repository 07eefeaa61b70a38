"""`jit policy check` and `jit policy explain` through click: output lines and exit codes, with no
config file and no database anywhere."""

import pytest
from click.testing import CliRunner

from broker.cli import main as jit

POLICY = r"""
[entitlements.read]
description = "Read production"
vault_policies = ["prod-read"]
max_duration = "1h"
default_duration = "15m"

[entitlements.read.requesters]
groups = ["engineers"]

[entitlements.admin]
vault_policies = ["prod-admin"]
max_duration = "30m"

[entitlements.admin.requesters]
groups = ["engineers"]

[entitlements.admin.reason]
min_length = 10
ticket = '^INC-\d+$'

[entitlements.admin.approval]
required = 1
from_groups = ["security"]

[entitlements.admin.break_glass]
groups = ["oncall"]
reviewers = ["security"]
max_duration = "20m"

[entitlements.deploy]
vault_policies = ["deploy"]
max_duration = "15m"
default_duration = "10m"
requesters = { agents = ["ci-agent"] }
schedule = { timezone = "Europe/Berlin", days = ["mon", "tue", "wed", "thu", "fri"], hours = "08:00-18:00" }
"""  # noqa: E501

BROKEN = """[entitlements.admin]
vault_policies = ["root"]
max_duration = "forever"

[entitlements.admin.requesters]
grups = ["engineers"]
"""


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


def invoke(*args):
    # A config that does not exist: the policy commands must not need one.
    return CliRunner().invoke(jit, [str(a) for a in args], env={"JIT_CONFIG": "/nonexistent.toml"})


def test_check_a_good_policy(policy_file):
    from broker.backends import POLICY_KINDS
    from broker.policy import load_policy

    result = invoke("policy", "check", policy_file)
    assert result.exit_code == 0
    version = load_policy(policy_file, POLICY_KINDS).version[:12]
    assert result.stdout == f"{policy_file}: ok (3 entitlements, version {version})\n"


def test_check_prints_every_problem_with_its_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    result = invoke("policy", "check", path)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        f"{path}:2: admin: the root policy is never granted",
        f"{path}:3: admin: max_duration: cannot read duration 'forever': use seconds or text "
        "like 30m, 2h, 1h30m",
        f"{path}:5: admin has no requesters: give groups, email_domains, claims or agents in "
        "[entitlements.admin.requesters]",
        f"{path}:6: admin: requesters: unknown key 'grups'; did you mean 'groups'?",
    ]


def test_check_names_the_line_of_a_toml_syntax_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[entitlements.a]\nmax_duration = "1h\n')
    result = invoke("policy", "check", path)
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{path}:2: not valid TOML")


def test_check_a_missing_file_is_one_line_and_exit_2(tmp_path):
    result = invoke("policy", "check", tmp_path / "none.toml")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"jit: {tmp_path / 'none.toml'}: cannot read: No such file or directory"
    ]


def test_explain_an_allowed_request(policy_file):
    result = invoke(
        "policy", "explain", policy_file, "--as", "alice", "--groups", "engineers,sre",
        "--email", "alice@example.com", "--entitlement", "read", "--duration", "30m",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "read for alice@example.com (human, groups: engineers, sre): allowed, issued at once",
        "  + member of engineers",
        "  + 30m within the maximum 1h",
        "  + no approval needed: issued at once",
        "approval: none needed",
    ]


def test_explain_uses_the_default_duration_and_shows_who_approves(policy_file):
    result = invoke(
        "policy", "explain", policy_file, "--as", "alice", "--groups", "engineers",
        "-e", "admin", "--duration", "20m", "--reason", "INC-42 rotate the key",
        "--ticket", "INC-42",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "admin for alice (human, groups: engineers): allowed after 1 approval"
    assert "  + ticket INC-42 matches ^INC-\\d+$" in lines
    assert lines[-1] == "approval: 1 approval from members of security"

    default = invoke("policy", "explain", policy_file, "--as", "alice", "--groups", "engineers",
                     "-e", "read")  # fmt: skip
    assert "  + no duration given: the default 15m applies, within the maximum 1h" in (
        default.stdout.splitlines()
    )


def test_explain_a_refusal_exits_1_with_every_reason(policy_file):
    result = invoke(
        "policy", "explain", policy_file, "--as", "carol", "--groups", "contractors",
        "-e", "admin", "--duration", "2h", "--reason", "short", "--ticket", "JIRA-1",
    )  # fmt: skip
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "admin for carol (human, groups: contractors): refused (not_eligible)"
    assert lines[1:5] == [
        "  - admin admits members of engineers; carol is in contractors",
        "  - 2h is longer than the maximum 30m for admin",
        "  - reason must be at least 10 characters (it has 5)",
        "  - ticket JIRA-1 does not match ^INC-\\d+$",
    ]


def test_explain_without_reason_or_ticket_shows_what_will_be_asked(policy_file):
    result = invoke("policy", "explain", policy_file, "--as", "alice", "--groups", "engineers",
                    "-e", "admin", "--duration", "5m")  # fmt: skip
    assert result.exit_code == 0
    assert "  ? a reason of at least 10 characters is required" in result.stdout.splitlines()
    assert "  ? a ticket matching ^INC-\\d+$ is required" in result.stdout.splitlines()


@pytest.mark.parametrize(
    ("at", "code", "line"),
    [
        ("2026-01-05T09:00:00Z", 0, "  + inside the schedule mon-fri 08:00-18:00 Europe/Berlin"),
        ("2026-01-10T09:00:00Z", 1, "  - deploy may be active mon-fri 08:00-18:00 Europe/Berlin"),
    ],
)
def test_explain_an_agent_at_a_given_time(policy_file, at, code, line):
    result = invoke("policy", "explain", policy_file, "--as", "ci-agent", "--agent",
                    "-e", "deploy", "--at", at)  # fmt: skip
    assert result.exit_code == code, result.output
    assert any(out.startswith(line) for out in result.stdout.splitlines()), result.stdout


def test_an_agent_flag_keeps_groups_from_admitting(policy_file):
    result = invoke("policy", "explain", policy_file, "--as", "ci-agent", "--agent",
                    "--groups", "engineers", "-e", "read")  # fmt: skip
    assert result.exit_code == 1
    assert "  - read admits no agents; ci-agent is an agent" in result.stdout.splitlines()


def test_explain_an_unknown_entitlement_lists_the_known_ones(policy_file):
    result = invoke("policy", "explain", policy_file, "--as", "alice", "-e", "nope")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[1:] == [
        "  - no entitlement named 'nope' in the policy",
        "  entitlements in the policy: read, admin, deploy",
    ]


@pytest.mark.parametrize(("option", "value"), [("--duration", "soon"), ("--at", "yesterday-ish")])
def test_explain_bad_input_is_a_usage_error(policy_file, option, value):
    result = invoke("policy", "explain", policy_file, "--as", "a", "-e", "read", option, value)
    assert result.exit_code == 2
    assert option in result.output


def test_explain_a_broken_policy_prints_its_problems(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    result = invoke("policy", "explain", path, "--as", "a", "-e", "admin")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == f"{path}:2: admin: the root policy is never granted"


def test_explain_the_break_glass_path(policy_file):
    allowed = invoke(
        "policy", "explain", policy_file, "--as", "olga", "--groups", "oncall", "-e", "admin",
        "--duration", "15m", "--reason", "payments are down", "--break-glass",
    )  # fmt: skip
    assert allowed.exit_code == 0, allowed.output
    assert allowed.stdout.splitlines() == [
        "admin for olga (human, groups: oncall): allowed through break-glass, issued at once, "
        "reviewed afterwards",
        "  + break-glass: requester is in oncall",
        "  + 15m is within the break-glass maximum 20m",
        "  + a reason is given",
        "  + break-glass: approvals, ticket, schedule and max_active are bypassed; security must "
        "review it within 24h",
    ]
    refused = invoke(
        "policy", "explain", policy_file, "--as", "alice", "--groups", "engineers", "-e", "admin",
        "--reason", "short", "--break-glass",
    )  # fmt: skip
    assert refused.exit_code == 1
    assert refused.stdout.splitlines()[0].endswith("refused (not_eligible)")
