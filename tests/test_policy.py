import pytest

from broker.errors import ConfigError
from broker.models import Principal
from broker.policy import load_policy

POLICY = """
[entitlements.prod-read]
description = "Read production"
groups = ["engineers", "sre"]
max_duration = "1h"
vault_policies = ["prod-read"]

[entitlements.prod-admin]
groups = ["security"]
max_duration = "15m"
vault_policies = ["prod-admin"]
"""

ALICE = Principal("https://idp", "alice", groups=("engineers",), email="alice@example.com")


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


def test_member_within_maximum_is_allowed_with_reasons(policy):
    decision = policy.evaluate(ALICE, "prod-read", 1800)
    assert decision.allowed
    assert decision.reasons == ("member of engineers", "30m within the maximum 1h")
    assert len(decision.policy_hash) == 64


def test_unknown_entitlement(policy):
    decision = policy.evaluate(ALICE, "nope", 60)
    assert (decision.allowed, decision.error) == (False, "unknown_entitlement")


def test_not_in_any_group_names_the_groups(policy):
    decision = policy.evaluate(ALICE, "prod-admin", 60)
    assert (decision.allowed, decision.error) == (False, "not_eligible")
    assert "security" in decision.reasons[0]


def test_longer_than_maximum(policy):
    decision = policy.evaluate(ALICE, "prod-read", 3601)
    assert (decision.allowed, decision.error) == (False, "duration_too_long")
    assert "1h" in decision.reasons[0]


def test_eligible_lists_only_admitting_entitlements(policy):
    assert [e.name for e in policy.eligible(ALICE)] == ["prod-read"]


def test_policy_hash_changes_with_the_file(tmp_path, policy):
    path = tmp_path / "other.toml"
    path.write_text(POLICY + "\n# reviewed\n")
    assert load_policy(path).version != policy.version


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (
            '[entitlements.x]\ngroups=["a"]\nmax_duration="1h"\nvault_policies=["p"]\ncolour="red"',
            "unknown key 'colour'",
        ),
        (
            '[entitlements.x]\ngroups=["a"]\nmax_duration="forever"\nvault_policies=["p"]',
            "max_duration",
        ),
        ('[entitlements.x]\ngroups=[]\nmax_duration="1h"\nvault_policies=["p"]', "groups"),
        ('[entitlements.x]\ngroups=["a"]\nmax_duration="1h"\nvault_policies=["root"]', "root"),
        (
            '[entitlements.x]\ngroups=["a"]\nmax_duration="1h"\nvault_policies=["p"]\nbackend="ftp"',
            "unknown backend",
        ),
        ("[entitlements.x\n", "not valid TOML"),
        ("[people]\n", "unknown top-level"),
    ],
)
def test_broken_policies_are_refused_with_the_reason(tmp_path, text, complaint):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint):
        load_policy(path)
