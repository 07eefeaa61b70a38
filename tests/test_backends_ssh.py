"""SSH certificates end to end: real access tokens, real certificates signed by OpenBao's SSH
engine for the requester's own key. A certificate ends by the window end and cannot be revoked,
so a release records the end and the reaper verifies once the certificate's validity is over."""

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import render_template

from broker import audit
from broker.backends.ssh import SshCertificateBackend, SshOptions
from broker.errors import VaultRejected
from broker.models import IssuedCredential, parse_time, utcnow
from broker.policy import Entitlement

SSH_POLICY = """
[entitlements.ssh-deploy]
description = "Log in to the deploy hosts"
backend = "ssh"
max_duration = "1h"

[entitlements.ssh-deploy.requesters]
groups = ["engineers"]

[entitlements.ssh-deploy.ssh]
role = "jit-users"
principals = ["deploy", "alice"]

[entitlements.ssh-deploy.extend]
max_step = "30m"
max_total = "2h"
"""


def openssh_public_key(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


@pytest.fixture(scope="module")
def key_pair():
    private_key = Ed25519PrivateKey.generate()
    return private_key, openssh_public_key(private_key) + " alice@laptop"


@pytest.fixture
def app(make_app, ssh_engine):
    return make_app(policy_text=SSH_POLICY)


@pytest.fixture
def grants(app):
    return app.extensions["jit"].grants


@pytest.fixture
def api(app, api_for):
    return api_for(app)


def ask(api, public_key, duration="10m"):
    body = {
        "entitlement": "ssh-deploy",
        "duration": duration,
        "reason": "INC-9 deploy the fix",
        "public_key": public_key,
    }
    return api("POST", "/api/v1/requests", body=body)


def certificate_of(body):
    return serialization.load_ssh_public_identity(body["credential"]["certificate"].encode())


def test_a_request_gives_a_certificate_for_the_key_capped_to_the_window(
    api, grants, key_pair, ssh_engine
):
    private_key, public_key = key_pair
    response = ask(api, public_key)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    credential = body["credential"]
    assert credential["type"] == "ssh"
    assert sorted(credential["valid_principals"]) == ["alice", "deploy"]

    cert = certificate_of(body)
    assert cert.public_key() == private_key.public_key()
    assert sorted(cert.valid_principals) == [b"alice", b"deploy"]
    assert cert.type == serialization.SSHCertificateType.USER
    assert body["id"] in cert.key_id.decode()
    end = parse_time(body["window"]["end"]).timestamp()
    assert end - 2 <= cert.valid_before <= end
    assert parse_time(credential["valid_before"]).timestamp() == cert.valid_before

    # Signed by the engine's CA.
    cert.verify_cert_signature()
    ca = serialization.load_ssh_public_key(
        ssh_engine.read("ssh/config/ca")["data"]["public_key"].encode()
    )
    assert cert.signature_key() == ca

    # The chain holds the key's fingerprint, not the key or the certificate.
    issued = next(e for e in grants.chain(body["id"]) if e["type"] == "issue")
    assert issued["data"]["public_key_sha256"].startswith("SHA256:")
    chain = str(grants.chain(body["id"]))
    assert public_key.split()[1] not in chain
    assert credential["certificate"].split()[1] not in chain


@pytest.mark.parametrize(
    "public_key",
    ["", None, "ssh-ed25519 not-base64", "hello", "-----BEGIN PUBLIC KEY-----\nAAAA\n"],
)
def test_a_missing_or_bad_public_key_is_refused_before_anything_is_recorded(
    api, grants, public_key
):
    response = ask(api, public_key)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"] == "invalid_request"
    assert "public_key" in response.get_json()["detail"]
    assert grants.store.grants_in(("issuing", "active", "issue_failed")) == []


def test_the_certificate_is_gone_when_the_window_ends(api, grants, key_pair):
    response = ask(api, key_pair[1], "3s")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    end = parse_time(body["window"]["end"])
    assert certificate_of(body).valid_before <= end.timestamp()

    wait_until(end)
    grants.reap_due(end)
    assert grants.store.get_grant(body["id"]).status == "revoked"
    verify = grants.chain(body["id"])[-1]
    assert (verify["type"], verify["data"]["gone"]) == ("verify", True)
    assert "cannot be revoked" in verify["data"]["method"]


def test_a_release_records_the_end_and_is_verified_when_the_certificate_expires(
    api, grants, key_pair
):
    alerts = []
    grants.notify = lambda event, text, **details: alerts.append(event)
    body = ask(api, key_pair[1], "30m").get_json()
    valid_before = datetime.fromtimestamp(certificate_of(body).valid_before, UTC)

    released = api("POST", f"/api/v1/requests/{body['id']}/release")
    assert released.status_code == 200
    grants.reap_due()
    grant = grants.store.get_grant(body["id"])
    assert grant.status == "released"  # not revoked: the certificate still works
    assert parse_time(grant.due_at) == valid_before
    release = next(e for e in grants.chain(body["id"]) if e["type"] == "release")
    assert parse_time(release["data"]["credential_valid_until"]) == valid_before
    assert "revoke_failed" not in alerts

    backend = grants.backends["ssh"]
    backend.clock = lambda: valid_before  # the certificate's last second has come
    grants.reap_due(valid_before)
    assert grants.store.get_grant(body["id"]).status == "revoked"
    assert grants.chain(body["id"])[-1]["data"]["gone"] is True
    assert "revoke_failed" not in alerts
    assert audit.verify(grants.store.audit_entries()).ok


def test_the_credential_page_says_the_certificate_cannot_be_revoked(app, grants, key_pair):
    credential = IssuedCredential(
        secret="ssh-ed25519-cert-v01@openssh.com AAAA",
        handle="{}",
        expires_at=datetime.now(UTC),
        kind="ssh",
        details={"valid_principals": ["deploy"], "valid_before": "2030-01-01T00:00:00Z"},
    )
    grant = SimpleNamespace(id="g1", entitlement="ssh-deploy", window_end="2030-01-01T00:00:00Z")
    with app.test_request_context():
        page = render_template("credential.html", grant=grant, credential=credential)
    assert "cannot be revoked early" in page
    assert "stays valid until its window end" in page


def wait_until(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05)


def test_an_extension_signs_a_new_certificate_and_records_the_old_one_honestly(
    api, grants, key_pair
):
    first = ask(api, key_pair[1]).get_json()
    extended = api(
        "POST",
        f"/api/v1/requests/{first['id']}/extend",
        body={"duration": "10m", "public_key": key_pair[1]},
    )
    assert extended.status_code == 200, extended.get_json()
    new_end = parse_time(extended.get_json()["window"]["end"])
    assert certificate_of(extended.get_json()).valid_before <= new_end.timestamp()
    assert certificate_of(extended.get_json()).serial != certificate_of(first).serial
    last = grants.chain(first["id"])[-1]
    assert last["type"] == "replaced"
    assert last["data"]["revocable"] is False
    assert last["data"]["valid_until"] == first["window"]["end"]
    assert grants.store.get_grant(first["id"]).status == "active"


def test_an_ssh_signing_answer_that_is_no_certificate_is_vault_rejected_not_a_crash():
    """load_ssh_public_identity may return a bare public key; it was cast to a certificate, and
    its missing valid_before was an AttributeError (a 500, the grant left `issuing`) instead of a
    refusal that marks the grant issue_failed at once."""
    bare_key = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    answer = {"data": {"signed_key": bare_key}}
    client = SimpleNamespace(
        secrets=SimpleNamespace(ssh=SimpleNamespace(sign_ssh_key=lambda **_: answer))
    )
    entitlement = Entitlement(
        name="ssh-deploy",
        description="",
        backend="ssh",
        vault_policies=(),
        max_duration=3600,
        options=SshOptions("jit-users", ("deploy",)),
    )
    backend = SshCertificateBackend(client)
    with pytest.raises(VaultRejected, match="not a certificate"):
        backend.issue("g-1", entitlement, utcnow() + timedelta(minutes=10), "alice", bare_key)
