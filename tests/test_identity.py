"""The bearer-token checks of RFC 8725 / RFC 9068, one rule each. Tokens the real provider will not
mint (expired, foreign issuer, alg none, HMAC with the public key) are signed here with a test key
whose JWKS `responses` serves; the real provider's tokens are tested end to end in
test_web_api.py."""

import time

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import ProviderUnavailable, Unauthenticated
from broker.identity import BearerVerifier, ProviderKeys, ProviderMetadata
from broker.models import Principal

ISSUER = "https://idp.test"
AUDIENCE = "urn:jit-broker:api"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def jwks() -> dict:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    return {"keys": [dict(public, kid="k1", use="sig", alg="RS256")]}


@pytest.fixture
def verifier():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(
            f"{ISSUER}/.well-known/openid-configuration",
            json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks"},
        )
        mock.get(f"{ISSUER}/jwks", json=jwks())
        yield BearerVerifier(ProviderMetadata(ISSUER), AUDIENCE, ["RS256", "ES256"], leeway=0)


def token(key=KEY, alg="RS256", typ="at+jwt", kid="k1", drop=(), **claims) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "client_id": "jit-cli",
        "groups": ["engineers"],
        "email": "alice@example.com",
    }
    body.update(claims)
    for name in drop:
        body.pop(name)
    return jwt.encode(body, key, algorithm=alg, headers={"typ": typ, "kid": kid})


def test_a_good_token_gives_the_principal(verifier):
    principal = verifier.verify(token())
    assert (principal.subject, principal.kind, principal.groups) == (
        "alice",
        "human",
        ("engineers",),
    )


def test_an_azp_naming_the_same_client_is_accepted(verifier):
    assert verifier.verify(token(azp="jit-cli")).client_id == "jit-cli"


def test_client_credentials_token_is_an_agent(verifier):
    assert verifier.verify(token(sub="ci-agent", client_id="ci-agent")).kind == "agent"


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: token(exp=int(time.time()) - 5), "expired"),
        (lambda: token(iss="https://idp.test/"), "issuer"),
        (lambda: token(iss="https://evil.test"), "issuer"),
        (lambda: token(aud="urn:other"), "(?i)audience"),
        (lambda: token(drop=("exp",)), "exp"),
        (lambda: token(drop=("iat",)), "iat"),
        (lambda: token(drop=("sub",)), "sub"),
        (lambda: token(typ="JWT"), "typ"),
        (lambda: token(key=OTHER_KEY), "(?i)signature"),
        (lambda: token(kid="unknown"), "not signed by a key"),
        (lambda: token(key=None, alg="none"), "algorithm"),
        (lambda: token(alg="HS256", key=b"a shared secret of thirty-two bytes"), "algorithm"),
        (lambda: token(groups="engineers"), "groups"),
        (lambda: "not-a-jwt", "not a JWT"),
        (lambda: token(drop=("client_id",)), "client_id"),
        (lambda: token(client_id=""), "client_id"),
        (lambda: token(client_id=["jit-cli"]), "client_id"),
        (lambda: token(azp="someone-else"), "azp"),
        (lambda: token(azp=None), "azp"),
        (lambda: token(key=EC_KEY, alg="ES256"), "does not match its key"),
    ],
)
def test_bad_tokens_are_refused_with_the_reason(verifier, make, why):
    with pytest.raises(Unauthenticated, match=why):
        verifier.verify(make())


def test_discovery_naming_another_issuer_is_refused():
    with responses.RequestsMock() as mock:
        mock.get(
            f"{ISSUER}/.well-known/openid-configuration",
            json={"issuer": "https://evil.test", "jwks_uri": f"{ISSUER}/jwks"},
        )
        verifier = BearerVerifier(ProviderMetadata(ISSUER), AUDIENCE, ["RS256"])
        with pytest.raises(ProviderUnavailable, match="calls itself"):
            verifier.verify(token())


def test_a_provider_that_fails_is_unavailable_not_unauthenticated():
    with responses.RequestsMock() as mock:
        mock.get(f"{ISSUER}/.well-known/openid-configuration", status=500)
        verifier = BearerVerifier(ProviderMetadata(ISSUER), AUDIENCE, ["RS256"])
        with pytest.raises(ProviderUnavailable):
            verifier.verify(token())


def test_other_identity_claims_are_kept_and_protocol_claims_are_not(verifier):
    principal = verifier.verify(token(department="eng", teams=["db", "web"], nonce="n", level=3))
    claims = principal.claims()
    assert claims["department"] == "eng" and claims["teams"] == ["db", "web"]
    for dropped in ("aud", "exp", "iat", "nonce", "level"):
        assert dropped not in claims
    assert Principal.from_claims(claims) == principal


def test_a_token_verified_once_is_not_verified_again(verifier, monkeypatch):
    """Issue 15: its claims cannot change, so the signature is checked once per token."""
    good = token()
    first = verifier.verify(good)
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: pytest.fail("verified again"))
    assert verifier.verify(good) == first


def test_a_remembered_token_is_refused_once_it_expires(verifier):
    soon = token(exp=int(time.time()) + 1)
    verifier.verify(soon)
    time.sleep(2.1)  # past exp (leeway 0): the remembered verification no longer counts
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(soon)


def test_a_remembered_token_is_refused_once_its_key_is_withdrawn():
    """The provider stops listing the key: the next fetch drops it, and what it signed with it,
    remembered or not, is refused."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(
            f"{ISSUER}/.well-known/openid-configuration",
            json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks"},
        )
        mock.get(f"{ISSUER}/jwks", json=jwks())
        other = jwt.algorithms.RSAAlgorithm.to_jwk(OTHER_KEY.public_key(), as_dict=True)
        mock.get(f"{ISSUER}/jwks", json={"keys": [dict(other, kid="k2", alg="RS256")]})
        metadata = ProviderMetadata(ISSUER)
        keys = ProviderKeys(metadata, cooldown=0, lifetime=(0, 0, 0))  # fetched on every use
        verifier = BearerVerifier(metadata, AUDIENCE, ["RS256"], leeway=0, keys=keys)
        good = token()
        verifier.verify(good)
        with pytest.raises(Unauthenticated, match="not signed by a key of the provider"):
            verifier.verify(good)
