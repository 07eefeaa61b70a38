"""How the broker keeps the provider's signing keys (issue 10, item 6), against a real little HTTP
server playing the provider (helpers.JwksServer) and against the real provider: at most one
fetch per cooldown even when fetches fail, no stall for tokens whose key is cached while a fetch
hangs, a lifetime taken from Cache-Control within bounds, a withdrawn key refused once the keys
are fetched again. Time is an injected clock, never a sleep."""

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from broker.errors import ProviderUnavailable, Unauthenticated
from broker.identity import BearerVerifier, ProviderKeys, ProviderMetadata
from tests.helpers import AUDIENCE, JwksServer, SigningKey

KEY = SigningKey("k1")
NEXT_KEY = SigningKey("k2")


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def server():
    jwks = JwksServer([KEY])
    yield jwks
    jwks.stop()


@pytest.fixture
def clock():
    return Clock()


def verifier_for(issuer: str, clock: Clock, cooldown: float = 30, timeout: float = 5):
    metadata = ProviderMetadata(issuer)
    keys = ProviderKeys(metadata, cooldown=cooldown, timeout=timeout, clock=clock)
    return BearerVerifier(metadata, AUDIENCE, ["RS256", "ES256"], keys=keys)


def outcome(verifier: BearerVerifier, token: str) -> str:
    """What the broker makes of a token, as the API would answer it."""
    try:
        verifier.verify(token)
    except Unauthenticated:
        return "401"
    except ProviderUnavailable:
        return "503"
    return "ok"


def test_random_kids_against_a_failing_jwks_fetch_once_per_cooldown(server, clock):
    server.status = 500
    verifier = verifier_for(server.issuer, clock)
    junk = [KEY.token(server.issuer, kid=secrets.token_hex(8)) for _ in range(40)]
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda token: outcome(verifier, token), junk))
    assert server.fetches == 1
    # No key is known and the provider cannot say which it has: unavailable, not "bad token".
    assert set(outcomes) == {"503"}

    clock.advance(29)
    assert outcome(verifier, junk[0]) == "503" and server.fetches == 1
    clock.advance(2)  # the cooldown is over: one more try, and it works this time
    server.status = 200
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"
    assert server.fetches == 2
    # Keys known now: more junk kids are plain 401s and fetch nothing within the cooldown.
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda token: outcome(verifier, token), junk)) == {"401"}
    assert server.fetches == 2


def test_random_kids_against_a_working_jwks_fetch_once_per_cooldown(server, clock):
    verifier = verifier_for(server.issuer, clock)
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"
    clock.advance(31)
    junk = [KEY.token(server.issuer, kid=secrets.token_hex(8)) for _ in range(20)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda token: outcome(verifier, token), junk)) == {"401"}
    assert server.fetches == 2


def _in_thread(function, *args) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(function(*args)), daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("stale", [False, True], ids=["fresh-cache", "cache-past-its-lifetime"])
def test_a_hanging_jwks_fetch_does_not_stall_tokens_whose_key_is_cached(server, clock, stale):
    verifier = verifier_for(server.issuer, clock, cooldown=0, timeout=30)
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"
    server.hang = True
    if stale:
        clock.advance(601)  # the next token to arrive fetches again, and hangs
        trigger = KEY.token(server.issuer)
    else:  # a token naming a key we have not seen makes the fetch
        trigger = KEY.token(server.issuer, kid="rotated-in")
    hanging, hanging_result = _in_thread(outcome, verifier, trigger)
    assert server.arrived.wait(10), "the fetch never reached the JWKS endpoint"

    # While that fetch is held at the provider, a token whose key is cached is answered.
    valid, valid_result = _in_thread(outcome, verifier, KEY.token(server.issuer, sub="bob"))
    valid.join(10)
    try:
        assert not valid.is_alive(), "a valid token waited for the hanging JWKS fetch"
        assert valid_result == ["ok"]
        assert hanging.is_alive() and not server.release.is_set()  # still held back
        assert server.fetches == 2  # the valid token started no second fetch
    finally:
        server.release.set()
    hanging.join(10)
    assert hanging_result == (["ok"] if stale else ["401"])


def test_a_key_withdrawn_from_the_jwks_is_refused_once_the_cache_lifetime_passes(server, clock):
    server.cache_control = "public, max-age=120"
    verifier = verifier_for(server.issuer, clock)
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"

    server.keys = [NEXT_KEY]  # the provider rotates k1 out
    clock.advance(119)
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"  # still within max-age
    assert server.fetches == 1
    clock.advance(2)
    assert outcome(verifier, KEY.token(server.issuer)) == "401"
    assert outcome(verifier, NEXT_KEY.token(server.issuer)) == "ok"
    assert server.fetches == 2


def test_when_the_refetch_fails_the_cached_keys_stay_until_one_succeeds(server, clock):
    verifier = verifier_for(server.issuer, clock)
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"
    server.keys, server.status = [NEXT_KEY], 500
    clock.advance(601)  # past the default lifetime of ten minutes
    assert outcome(verifier, KEY.token(server.issuer)) == "ok"  # the provider is down: keep k1
    assert server.fetches == 2
    clock.advance(31)
    server.status = 200
    assert outcome(verifier, KEY.token(server.issuer)) == "401"  # it answered without k1
    assert server.fetches == 3


@pytest.mark.parametrize(
    ("cache_control", "kept", "refetched"),
    [
        ("", 599, 601),  # no max-age: ten minutes
        ("max-age=300", 299, 301),
        ("max-age=5", 59, 61),  # at least a minute
        ("no-store", 59, 61),
        ("max-age=31536000", 86399, 86401),  # at most a day
        ("max-age=junk", 599, 601),
    ],
)
def test_the_cache_lifetime_follows_cache_control_within_bounds(
    server, clock, cache_control, kept, refetched
):
    server.cache_control = cache_control
    verifier = verifier_for(server.issuer, clock)
    token = KEY.token(server.issuer)
    assert outcome(verifier, token) == "ok"
    clock.advance(kept)
    assert outcome(verifier, token) == "ok" and server.fetches == 1
    clock.advance(refetched - kept)
    assert outcome(verifier, token) == "ok" and server.fetches == 2


def test_the_real_providers_tokens_keep_working_across_refetches(
    oidc_provider, tokens, clock, monkeypatch
):
    """The real provider's JWKS answer parses, its keys are fetched again after the lifetime and
    its tokens still verify; a made-up kid fetches nothing within the cooldown."""
    metadata = ProviderMetadata(oidc_provider.issuer)
    jwks_uri = metadata.get()["jwks_uri"]
    alice, bob = tokens("alice"), tokens("bob")
    fetched = []
    real_get = requests.get

    def counting_get(url, **kwargs):  # requests.get itself, counting the JWKS fetches
        if url == jwks_uri:
            fetched.append(url)
        return real_get(url, **kwargs)

    monkeypatch.setattr("broker.identity.requests.get", counting_get)
    keys = ProviderKeys(metadata, clock=clock)
    verifier = BearerVerifier(metadata, oidc_provider.api_resource, ["RS256", "ES256"], keys=keys)
    assert verifier.verify(alice).subject == "alice"
    assert fetched == [jwks_uri]
    with pytest.raises(Unauthenticated, match="not signed by a key"):
        verifier.verify(KEY.token(oidc_provider.issuer, kid="no-such-key"))
    assert fetched == [jwks_uri]
    clock.advance(86401)
    assert verifier.verify(bob).subject == "bob"
    assert fetched == [jwks_uri, jwks_uri]
