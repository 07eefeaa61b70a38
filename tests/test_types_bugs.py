"""What typing broker/ showed up: answers the types allow but the code took for granted."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.backends.ssh import SshCertificateBackend
from broker.errors import VaultRejected
from broker.models import utcnow
from broker.policy import Entitlement, SshOptions


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
        ssh=SshOptions("jit-users", ("deploy",)),
    )
    backend = SshCertificateBackend(client)
    with pytest.raises(VaultRejected, match="not a certificate"):
        backend.issue("g-1", entitlement, utcnow() + timedelta(minutes=10), "alice", bare_key)
