"""broker/oauth/signing.py against the real OpenBao transit engine: tokens signed there verify with
pyjwt against the JWK Set the live broker serves, before and after a key rotation; a missing key
or one of the wrong type is said plainly, never a crash."""

import jwt
import pytest

from broker.errors import SigningKeyUnavailable
from broker.oauth import TokenSigner
from broker.oauth.signing import KEY_TYPE
from tests.helpers import wait_until

KEY = "jit-broker-tokens"


def claims(**extra):
    now = 1_900_000_000
    return {
        "aud": "https://tools.internal/github",
        "sub": "alice",
        "client_id": "ci-agent",
        "iat": now,
        "exp": now + 300,
        "jti": "8c9a4d7e",
        "scope": "issues:read",
        "act": {"sub": "ci-agent"},
        **extra,
    }


@pytest.fixture
def signer(broker):
    """The live broker's own signer, with a fresh read of the key for each test."""
    signer = broker.app.extensions["jit"].signer
    signer.versions(fresh=True)
    return signer


@pytest.fixture
def jwks_client(broker):
    """pyjwt's JWKS client over real HTTP, fetching afresh each time (no cache across rotations)."""
    return lambda: jwt.PyJWKClient(f"{broker.url}/.well-known/jwks.json", cache_jwk_set=False)


def verify(token, jwks_client, broker):
    key = jwks_client().get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience="https://tools.internal/github",
        issuer=broker.url,
        options={"verify_exp": False, "verify_iat": False},  # the claims' times are fixed
    )


def test_a_token_signed_by_transit_verifies_with_pyjwt_against_the_served_jwks(
    signer, jwks_client, broker
):
    token, kid = signer.issue(claims())

    header = jwt.get_unverified_header(token)
    latest = signer.signing_version()
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": f"{KEY}-v{latest}"}
    assert kid == header["kid"]
    assert verify(token, jwks_client, broker) == {**claims(), "iss": broker.url}


def test_a_token_changed_after_signing_does_not_verify(signer, jwks_client, broker):
    token, _ = signer.issue(claims())
    header, payload, signature = token.split(".")
    other, _ = signer.issue(claims(scope="issues:write"))

    forged = ".".join([header, other.split(".")[1], signature])
    with pytest.raises(jwt.InvalidSignatureError):
        verify(forged, jwks_client, broker)


def test_after_a_rotation_old_tokens_still_verify_and_new_ones_carry_the_new_kid(
    signer, jwks_client, broker, openbao, monkeypatch
):
    """The new version is published at once and signs only `publish_delay` after transit made
    it, so a verifier can learn its key before a token names it."""
    monkeypatch.setattr(signer, "publish_delay", 2)
    old_token, old_kid = signer.issue(claims())
    old_version = signer.versions().latest
    assert old_kid == f"{KEY}-v{signer.signing_version()}"

    openbao.client().secrets.transit.rotate_key(KEY)  # the operator's, with their own token
    signer.versions(fresh=True)  # or wait for keys_ttl
    new_kid = f"{KEY}-v{old_version + 1}"
    published = [key.key_id for key in jwks_client().get_jwk_set().keys]
    assert published[0] == new_kid and old_kid in published  # newest first
    soon_token, soon_kid = signer.issue(claims())
    assert soon_kid == old_kid  # published, not signing yet
    assert signer.health()["next_key"]["kid"] == new_kid

    assert wait_until(lambda: signer.signing_version() == old_version + 1, timeout=10)
    new_token, kid = signer.issue(claims())
    assert kid == new_kid
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert "next_key" not in signer.health()
    for token in (old_token, soon_token, new_token):
        assert verify(token, jwks_client, broker)["jti"] == "8c9a4d7e"


def test_a_retired_version_leaves_the_jwks_and_its_tokens_no_longer_verify(
    signer, jwks_client, broker, openbao
):
    old_token, old_kid = signer.issue(claims())
    root = openbao.client()
    root.secrets.transit.rotate_key(KEY)
    latest = signer.versions(fresh=True).latest
    root.secrets.transit.update_key_configuration(KEY, min_decryption_version=latest)
    signer.versions(fresh=True)

    assert [key.key_id for key in jwks_client().get_jwk_set().keys] == [f"{KEY}-v{latest}"]
    with pytest.raises(jwt.PyJWKClientError, match="Unable to find a signing key"):
        verify(old_token, jwks_client, broker)
    assert verify(signer.issue(claims())[0], jwks_client, broker)["sub"] == "alice"


def test_a_signer_with_a_stale_version_signs_with_the_current_one(signer, openbao):
    """The key's versions are cached; a version retired meanwhile is read again, once."""
    stale = signer.versions().latest
    root = openbao.client()
    root.secrets.transit.rotate_key(KEY)
    root.secrets.transit.update_key_configuration(KEY, min_encryption_version=stale + 1)
    try:
        _, kid = signer.issue(claims())  # cached: `stale`, which transit now refuses to use
    finally:
        root.secrets.transit.update_key_configuration(KEY, min_encryption_version=0)

    assert kid == f"{KEY}-v{stale + 1}"


@pytest.mark.parametrize("missing", ["exp", "aud", "sub", "client_id", "iat", "jti"])
def test_a_token_without_an_rfc_9068_claim_is_not_signed(signer, missing):
    incomplete = claims()
    del incomplete[missing]

    with pytest.raises(ValueError, match=missing):
        signer.issue(incomplete)


def test_a_token_naming_another_issuer_is_not_signed(signer):
    with pytest.raises(ValueError, match="iss must be"):
        signer.issue(claims(iss="https://evil.example"))


def test_a_missing_key_is_said_plainly(openbao):
    """With a token that may read the path (here root), OpenBao answers 404."""
    signer = TokenSigner(openbao.client(), "https://broker.example", key_name="absent")

    with pytest.raises(SigningKeyUnavailable, match="does not exist"):
        signer.issue(claims())
    health = signer.health()
    assert not health["ok"] and "transit/keys/absent does not exist" in health["error"]


def test_a_key_that_is_not_es256_is_refused(openbao):
    root = openbao.client()
    root.secrets.transit.create_key("not-es256", key_type="aes256-gcm96")
    signer = TokenSigner(root, "https://broker.example", key_name="not-es256")

    with pytest.raises(SigningKeyUnavailable, match=f"not {KEY_TYPE}"):
        signer.issue(claims())
    assert not signer.health()["ok"]
