"""The broker's own OpenBao policy (broker/openbao/jit-broker.hcl) is least privilege: with the
token the tests and scripts/dev give the broker (that policy alone), the broker cannot read
secrets, write policies, or make tokens beyond what its token role admits. That the same token
is enough for everything the broker does is proven by the rest of the suite, which runs every
broker with it; test_every_broker_under_test_holds_the_least_privilege_token checks that."""

import fnmatch
import tomllib
from pathlib import Path

import hvac.exceptions
import pytest
from click.testing import CliRunner

from broker.backends.vault import TOKEN_ROLE, openbao_policy
from broker.cli import main as jit
from scripts.launchers import BROKER_POLICY, DATABASE_READONLY_POLICY

ROOT = Path(__file__).resolve().parent.parent
PINNED_CREDS_RULE = 'path "database/creds/jit-readonly-*" { capabilities = ["read"] }'


def forbidden(call) -> bool:
    """True when OpenBao answers 403: the policy grants neither the path nor these parameters."""
    try:
        call()
    except hvac.exceptions.Forbidden:
        return True
    return False


def not_admitted(call) -> bool:
    """True when the token role refuses the token's policies (OpenBao answers 400)."""
    try:
        call()
    except hvac.exceptions.InvalidRequest as exc:
        return "must be subset of the role's allowed policies" in str(exc)
    return False


def test_jit_vault_policy_prints_the_shipped_policy_without_a_config():
    result = CliRunner().invoke(jit, ["vault-policy"], env={"JIT_CONFIG": "/nonexistent.toml"})

    assert result.exit_code == 0, result.output
    assert result.output == (ROOT / "broker" / "openbao" / "jit-broker.hcl").read_text()
    assert 'path "auth/token/create/jit-broker"' in result.output


def test_the_policy_file_is_package_data_so_the_wheel_carries_it():
    """`jit vault-policy` reads the file from the installed package: a wheel must carry it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["broker"]
    assert any(fnmatch.fnmatch("openbao/jit-broker.hcl", pattern) for pattern in patterns)


def test_every_broker_under_test_holds_the_least_privilege_token(broker, openbao):
    token = broker.app.extensions["jit"].settings.vault["token"]

    assert token == openbao.broker_token and token != openbao.root_token
    looked_up = openbao.client().auth.token.lookup(token)["data"]
    assert looked_up["policies"] == [BROKER_POLICY]  # not even "default"
    installed = openbao.client().sys.read_policy(BROKER_POLICY)["data"]["rules"]
    assert installed == openbao_policy()


def test_the_broker_token_cannot_read_secrets_or_change_openbao(broker_vault, vault_setup):
    assert forbidden(
        lambda: broker_vault.secrets.kv.v2.read_secret_version(
            "test/app", raise_on_deleted_version=True
        )
    )
    assert forbidden(lambda: broker_vault.sys.list_mounted_secrets_engines())
    assert forbidden(lambda: broker_vault.sys.enable_auth_method("userpass", path="jit-userpass"))
    assert forbidden(lambda: broker_vault.sys.read_policy("jit-test-admin"))
    # Widening a policy an entitlement grants, or writing one of its own.
    assert forbidden(
        lambda: broker_vault.sys.create_or_update_policy(
            "jit-test-read", 'path "*" {policy="sudo"}'
        )
    )
    assert forbidden(
        lambda: broker_vault.sys.create_or_update_policy("jit-db-x", PINNED_CREDS_RULE)
    )
    assert "jit-db-x" not in vault_setup.sys.list_policies()["data"]["policies"]


def test_the_one_policy_the_broker_writes_is_pinned_to_its_body(broker_vault, openbao):
    """The database backend writes jit-db-database-readonly on every issue: it may, but only
    with the body it always writes; another body would give its tokens anything."""
    broker_vault.sys.create_or_update_policy(DATABASE_READONLY_POLICY, PINNED_CREDS_RULE)

    widened = PINNED_CREDS_RULE + '\npath "secret/*" { capabilities = ["read"] }'
    assert forbidden(
        lambda: broker_vault.sys.create_or_update_policy(DATABASE_READONLY_POLICY, widened)
    )
    rules = openbao.client().sys.read_policy(DATABASE_READONLY_POLICY)["data"]["rules"]
    assert rules == PINNED_CREDS_RULE


def made_by_the_role(client, policies, **extra):
    return client.auth.token.create(role_name=TOKEN_ROLE, policies=policies, ttl="60s", **extra)


def test_the_broker_token_makes_tokens_only_with_policies_the_role_admits(broker_vault, openbao):
    root = openbao.client()
    allowed = made_by_the_role(broker_vault, ["jit-test-read"])["auth"]
    try:
        assert allowed["policies"] == ["default", "jit-test-read"]
        assert allowed["orphan"] is True  # outlives nothing of the broker's own token
        assert root.auth.token.lookup(allowed["client_token"])["data"]["renewable"] is False
    finally:
        root.auth.token.revoke_accessor(allowed["accessor"])

    root.sys.create_or_update_policy(
        "jit-test-outside", 'path "secret/*" { capabilities = ["read"] }'
    )
    for outside in (["jit-test-outside"], ["jit-test-read", "jit-test-outside"], ["root"]):
        assert not_admitted(lambda p=outside: made_by_the_role(broker_vault, p)), outside
    # Not around the role either: plain and orphan creation admit only the broker's own policies.
    assert forbidden(lambda: broker_vault.auth.token.create(policies=["jit-test-read"], ttl="60s"))
    assert forbidden(lambda: broker_vault.auth.token.create_orphan(policies=["jit-test-read"]))
    assert forbidden(lambda: broker_vault.auth.token.create(policies=[BROKER_POLICY], ttl="60s"))
    # Nor by remaking the role.
    assert forbidden(
        lambda: broker_vault.auth.token.create_or_update_role(
            TOKEN_ROLE, allowed_policies=["jit-test-outside"], orphan=True
        )
    )


@pytest.mark.usefixtures("database_engine", "ssh_engine")
def test_the_broker_token_reaches_only_its_own_database_roles_leases_and_ssh_role(
    broker_vault, openbao
):
    database = broker_vault.secrets.database
    assert database.read_role("readonly")["data"]["db_name"] == "jitpg"  # it may read its base
    assert forbidden(lambda: database.generate_credentials("readonly"))  # but make no user itself
    assert forbidden(
        lambda: database.create_role("admin", "jitpg", creation_statements=["SELECT 1"])
    )
    assert forbidden(lambda: database.delete_role("readonly"))
    assert forbidden(lambda: database.read_connection("jitpg"))  # the admin password's home
    # Leases of anything but the per-grant roles are out of its reach.
    lease = openbao.client().secrets.database.generate_credentials("readonly")["lease_id"]
    try:
        assert forbidden(lambda: broker_vault.sys.read_lease(lease))
        assert forbidden(lambda: broker_vault.sys.revoke_lease(lease))
        assert forbidden(lambda: broker_vault.sys.list_leases("database/creds/readonly/"))
        assert openbao.client().sys.read_lease(lease)["data"]["id"] == lease
    finally:
        openbao.client().sys.revoke_lease(lease)
    ssh = broker_vault.secrets.ssh
    assert forbidden(lambda: ssh.create_role("anyone", key_type="ca", allow_user_certificates=True))
    assert forbidden(lambda: ssh.read_role("jit-users"))


def test_the_broker_token_renews_and_looks_up_itself_only(broker_vault, openbao):
    """lookup-self and renew-self are in the policy (the token has no default policy); no other
    token's renewal or lookup is."""
    own = broker_vault.auth.token.lookup_self()["data"]
    assert own["policies"] == [BROKER_POLICY]
    assert broker_vault.auth.token.renew_self()["auth"]["lease_duration"] > 0

    other = openbao.client().auth.token.create(policies=["jit-test-read"], period="1h")["auth"]
    try:
        assert forbidden(lambda: broker_vault.auth.token.renew(other["client_token"]))
        assert forbidden(lambda: broker_vault.auth.token.renew_accessor(other["accessor"]))
        assert forbidden(lambda: broker_vault.auth.token.lookup(other["client_token"]))
    finally:
        openbao.client().auth.token.revoke_accessor(other["accessor"])


def test_the_broker_token_signs_with_its_transit_key_only_and_never_holds_it(broker_vault, openbao):
    """transit/sign and read of the one signing key: no export (the private key stays in
    OpenBao), no rotation or retiring of versions (the operator's), no other key."""
    transit = broker_vault.secrets.transit
    key = "jit-broker-tokens"
    assert transit.read_key(key)["data"]["type"] == "ecdsa-p256"
    assert transit.sign_data(key, hash_input="aGVsbG8=", marshaling_algorithm="jws")["data"]
    assert forbidden(lambda: transit.export_key(key, key_type="signing-key"))
    assert forbidden(lambda: transit.backup_key(key))
    assert forbidden(lambda: transit.rotate_key(key))
    assert forbidden(lambda: transit.update_key_configuration(key, min_decryption_version=1))
    assert forbidden(lambda: transit.delete_key(key))
    assert forbidden(lambda: transit.create_key("jit-broker-tokens-2", key_type="ecdsa-p256"))
    openbao.client().secrets.transit.create_key("someone-elses", key_type="ecdsa-p256")
    assert forbidden(lambda: transit.sign_data("someone-elses", hash_input="aGVsbG8="))
    assert forbidden(lambda: transit.read_key("someone-elses"))


def test_the_broker_token_signs_checkpoints_with_its_audit_key_only(broker_vault, vault_setup):
    """Issue 17: transit/sign and read of the checkpoint key (ed25519); the private key never
    leaves OpenBao, and rotating or retiring its versions is the operator's."""
    transit = broker_vault.secrets.transit
    key = "jit-broker-audit"
    assert transit.read_key(key)["data"]["type"] == "ed25519"
    assert transit.sign_data(key, hash_input="aGVsbG8=")["data"]["signature"].startswith("vault:v")
    assert forbidden(lambda: transit.export_key(key, key_type="signing-key"))
    assert forbidden(lambda: transit.backup_key(key))
    assert forbidden(lambda: transit.rotate_key(key))
    assert forbidden(lambda: transit.update_key_configuration(key, min_decryption_version=2))
    assert forbidden(lambda: transit.update_key_configuration(key, deletion_allowed=True))
    assert forbidden(lambda: transit.delete_key(key))
    assert forbidden(lambda: transit.create_key("jit-broker-audit-2", key_type="ed25519"))


def test_the_broker_token_adds_witness_versions_but_never_takes_one_back(broker_vault, openbao):
    """Issue 17: the KV v2 witness. Create and update add versions, read compares; deleting,
    destroying, undeleting, the metadata (max_versions, delete) and any other path: refused."""
    kv = broker_vault.secrets.kv.v2
    path = "jit-broker/audit-checkpoints"
    first = kv.create_or_update_secret(path, secret={"checkpoint": {"size": 0}})["data"]["version"]
    second = kv.create_or_update_secret(path, secret={"checkpoint": {"size": 0}})["data"]["version"]
    assert second == first + 1
    assert kv.read_secret_version(path, version=first, raise_on_deleted_version=True)["data"][
        "data"
    ] == {"checkpoint": {"size": 0}}
    assert forbidden(lambda: kv.delete_latest_version_of_secret(path))
    assert forbidden(lambda: kv.delete_secret_versions(path, versions=[first]))
    assert forbidden(lambda: kv.destroy_secret_versions(path, versions=[first]))
    assert forbidden(lambda: kv.undelete_secret_versions(path, versions=[first]))
    assert forbidden(lambda: kv.delete_metadata_and_all_versions(path))
    assert forbidden(lambda: kv.update_metadata(path, max_versions=1))
    assert forbidden(lambda: kv.read_secret_metadata(path))
    assert forbidden(lambda: kv.create_or_update_secret("jit-broker/other", secret={"a": 1}))
    assert forbidden(lambda: kv.read_secret_version("test/app", raise_on_deleted_version=True))
    latest = openbao.client().secrets.kv.v2.read_secret_version(path, raise_on_deleted_version=True)
    assert latest["data"]["metadata"]["version"] == second
