"""Who is asking. Turns a bearer JWT (RFC 9068 access token) or the claims of a verified OIDC login
into a Principal. Pinned algorithms, exact issuer and audience, required claims (RFC 8725)."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
import requests

from .errors import ProviderUnavailable, Unauthenticated
from .models import STANDARD_CLAIMS, Principal, extra_claims

log = logging.getLogger(__name__)

REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "client_id"]
ACCESS_TOKEN_TYPES = {"at+jwt", "application/at+jwt"}
# Header fields by which a token points at its own key (RFC 7515 §4.1): never followed.
KEY_SOURCE_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c"})
# Far above any real access token, far below what would cost us to parse.
MAX_TOKEN_LENGTH = 16 * 1024
# Seconds the JWKS is kept: (at least, when the provider names no max-age, at most).
# Verified tokens remembered at once (by hash): far more than the live tokens of any deployment.
VERIFIED_CACHE_SIZE = 10_000
JWKS_LIFETIME = (60.0, 600.0, 86400.0)
# Claims about the token or the login, not about the person: never policy material.
PROTOCOL_CLAIMS = frozenset(
    {
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "azp",
        "nonce",
        "at_hash",
        "c_hash",
        "auth_time",
        "acr",
        "amr",
        "sid",
        "scope",
        "typ",
        "preferred_username",
    }
)


class ProviderMetadata:
    """The provider's discovery document, fetched once and checked to name the configured
    issuer exactly (OpenID Connect Discovery §4.3)."""

    def __init__(self, issuer: str, timeout: float = 5, probe_every: float = 10):
        self.issuer = issuer
        self.timeout = timeout
        self.probe_every = probe_every
        self._document: dict | None = None
        self._lock = threading.Lock()
        self._probe: tuple[float, dict] | None = None  # (monotonic time, the last probe's check)

    @property
    def url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    def get(self) -> dict:
        with self._lock:
            if self._document is None:
                try:
                    response = requests.get(self.url, timeout=self.timeout)
                    response.raise_for_status()
                    document = response.json()
                except (requests.RequestException, ValueError) as exc:
                    raise ProviderUnavailable(
                        f"cannot read the OIDC provider's discovery document: {exc}"
                    ) from exc
                if document.get("issuer") != self.issuer:
                    raise ProviderUnavailable(
                        f"the provider calls itself {document.get('issuer')!r}, not {self.issuer!r}"
                    )
                self._document = document
            return self._document

    def health(self) -> dict:
        """For /readyz: whether the provider answers its discovery document now (a login or a
        token's keys need it). Asked at most every `probe_every` seconds, whatever the probe rate
        of the load balancer; never raises."""
        now = time.monotonic()
        probe = self._probe
        if probe is not None and now - probe[0] < self.probe_every:
            return probe[1]
        try:
            response = requests.get(self.url, timeout=min(self.timeout, 2))
            response.raise_for_status()
            check: dict = {"ok": True}
        except requests.RequestException as exc:
            check = {
                "ok": False,
                "error": f"the OIDC provider is unreachable: {type(exc).__name__}",
            }
        self._probe = (now, check)
        return check


class ProviderKeys:
    """The provider's signing keys (JWKS), parsed by pyjwt, cached for the lifetime the provider
    names (Cache-Control max-age, within bounds), so that a key withdrawn from its JWKS stops
    being trusted after the next successful fetch.

    Shaped by who can reach it: anyone can send a token with a made-up `kid`. So a fetch starts
    at most once per `cooldown`, whether it succeeds or fails; one fetch is in flight at a time;
    and no lock is held while it runs, so a slow or hanging provider delays only the requests
    that need keys the cache does not have. A request whose key is cached but past its lifetime
    fetches again itself (at most once per cooldown); meanwhile everyone else keeps using the
    cache, and if the fetch fails the cached keys stay: the provider being down is no reason to
    refuse the tokens it signed, while a key it stops listing is dropped.

    `metadata` is the provider's discovery document, or the JWKS URL itself: a tool checking the
    broker's tokens (broker/toolauth.py) is configured with it and reads no discovery document."""

    def __init__(
        self,
        metadata: ProviderMetadata | str,
        cooldown: float = 30,
        timeout: float = 5,
        lifetime: tuple[float, float, float] = JWKS_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metadata = metadata
        self.cooldown = cooldown
        self.timeout = timeout
        self.min_lifetime, self.default_lifetime, self.max_lifetime = lifetime
        self.clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._generation = 0  # counts successful fetches
        self._expires_at = -math.inf  # when the cached keys must be fetched again
        self._next_fetch_at = -math.inf  # the cooldown: no fetch starts before this
        self._in_flight: threading.Event | None = None  # set when the running fetch ends
        self._last_error = ""  # why the last fetch failed ("" when it succeeded)
        self._lock = threading.Lock()  # guards the fields above; never held across the network

    def get(self, kid: str) -> jwt.PyJWK | None:
        """The provider's key named `kid`, or None when it has none. Raises ProviderUnavailable
        when the key is not cached and the keys cannot be fetched."""
        with self._lock:
            now = self.clock()
            cached = self._keys.get(kid)
            if cached is not None and now < self._expires_at:
                return cached
            generation = self._generation
            mine, theirs = self._claim_fetch(now)
        if mine is not None:
            self._fetch(mine)
        elif theirs is not None and cached is None:
            theirs.wait(2 * self.timeout + 1)  # the fetch in flight may bring this key
        with self._lock:
            if self._generation != generation:  # fresh keys are the whole truth
                return self._keys.get(kid)
            if cached is None and self._last_error:
                raise ProviderUnavailable(self._last_error)
            return cached

    def _claim_fetch(self, now: float) -> tuple[threading.Event | None, threading.Event | None]:
        """(the fetch this caller must run, or None; the fetch in flight, or None). The cooldown
        counts from the start of a fetch, so a failing one is not retried on every request.
        Called with the lock held."""
        if self._in_flight is not None:
            return None, self._in_flight
        if now < self._next_fetch_at:
            return None, None
        self._next_fetch_at = now + self.cooldown
        self._in_flight = threading.Event()
        return self._in_flight, None

    def _fetch(self, done: threading.Event) -> None:
        keys, lifetime, error = None, 0.0, "the fetch did not finish"
        try:
            keys, lifetime = self._download()
        except ProviderUnavailable as exc:
            error = exc.detail
            log.warning("%s", error)
        finally:
            with self._lock:
                if keys is not None:
                    self._keys = keys  # a key the provider no longer lists is gone
                    self._generation += 1
                    self._expires_at = self.clock() + lifetime
                    error = ""
                self._last_error = error
                self._in_flight = None
            done.set()

    def _download(self) -> tuple[dict[str, jwt.PyJWK], float]:
        try:
            response = requests.get(self._jwks_uri(), timeout=self.timeout)
            response.raise_for_status()
            document = response.json()
            if not isinstance(document, dict):
                raise ValueError("the JWKS is not a JSON object")
            keys = jwt.PyJWKSet.from_dict(document)
        except (requests.RequestException, ValueError, TypeError, KeyError, jwt.PyJWTError) as exc:
            raise ProviderUnavailable(f"cannot fetch the provider's signing keys: {exc}") from exc
        lifetime = self._lifetime(response.headers.get("Cache-Control", ""))
        return {key.key_id: key for key in keys.keys if key.key_id}, lifetime

    def _jwks_uri(self) -> str:
        if isinstance(self.metadata, str):
            return self.metadata
        return str(self.metadata.get()["jwks_uri"])

    def _lifetime(self, cache_control: str) -> float:
        """max-age clamped to [min, max]; the default when none is named; the minimum when the
        provider forbids caching (we must keep the keys a little while to work at all)."""
        directives = [part.strip().lower() for part in cache_control.split(",")]
        if "no-store" in directives or "no-cache" in directives:
            return self.min_lifetime
        for directive in directives:
            name, _, value = directive.partition("=")
            value = value.strip().strip('"')
            if name.strip() == "max-age" and value.isascii() and value.isdigit():
                return min(max(float(value), self.min_lifetime), self.max_lifetime)
        return self.default_lifetime


class BearerVerifier:
    """Checks a bearer access token (RFC 9068) the RFC 8725 way. Everything in a token is chosen
    by whoever sent it, so the header is checked field by field before it selects anything, and
    every way a token can be wrong ends in Unauthenticated (a 401), never in another error."""

    def __init__(
        self,
        metadata: ProviderMetadata,
        audience: str,
        algorithms: list[str],
        groups_claim: str = "groups",
        leeway: int = 30,
        keys: ProviderKeys | None = None,
    ):
        self.metadata = metadata
        self.keys = keys or ProviderKeys(metadata)
        self.audience = audience
        self.algorithms = list(algorithms)
        self.groups_claim = groups_claim
        self.leeway = leeway
        self._verified: dict[bytes, _Verified] = {}  # by the token's SHA-256

    def verify(self, token: str) -> Principal:
        """Return the Principal the token vouches for, or raise Unauthenticated saying why.
        A token already verified is not checked again (the signature is most of a request's
        own cost): its claims cannot change, so only its `exp`, and whether the key that signed
        it is still the provider's, are looked at again."""
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is not None and time.time() < known.exp + self.leeway:
            if self.keys.get(known.kid) is known.key:  # still listed (fetched again: re-verify)
                return known.principal
        header = checked_header(token, self.algorithms)
        key = self.keys.get(header["kid"])
        if key is None:
            raise Unauthenticated("the token was not signed by a key of the provider")
        if key.algorithm_name != header["alg"]:
            # The key fixes the algorithm (its JWK `alg`, else the one its type implies): an
            # ES256 header naming an RSA key is refused here, not tried.
            raise Unauthenticated("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[header["alg"]],
                audience=self.audience,
                issuer=self.metadata.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the bearer token is not valid: {exc}") from None
        client_id = _client_id(claims)
        # A client acting for itself (client credentials: sub == client_id, RFC 9068 §2.2) is an
        # agent; a token obtained by someone logging in is a human's.
        kind = "agent" if claims["sub"] == client_id else "human"
        principal = principal_from_claims(claims, self.groups_claim, kind)
        self._remember(digest, _Verified(principal, header["kid"], key, float(claims["exp"])))
        return principal

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        """Bounded: when full, the expired go first, then the oldest. Dict operations are atomic
        under the GIL, so request threads share it without a lock."""
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            now = time.time() - self.leeway
            for stale in [d for d, v in list(self._verified.items()) if v.exp < now]:
                self._verified.pop(stale, None)
            while len(self._verified) >= VERIFIED_CACHE_SIZE:
                try:
                    del self._verified[next(iter(self._verified))]
                except (StopIteration, KeyError, RuntimeError):  # emptied by another thread
                    break
        self._verified[digest] = verified


@dataclass(frozen=True)
class _Verified:
    """What a verified token vouched for, and what must still hold to take it again."""

    principal: Principal
    kid: str
    key: jwt.PyJWK
    exp: float


def checked_header(token: str, algorithms: list[str]) -> dict:
    """The JOSE header of an access token, if every field a verifier reads has the shape it must
    have (RFC 8725): an accepted `alg`, `typ` at+jwt, a `kid`, no `crit`, no key of its own.
    Shared with broker/toolauth.py, which checks the broker's tokens the same way."""
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise Unauthenticated("the bearer token is not a JWT")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:  # not three base64url parts, not a JSON object, bad kid or crit
        raise Unauthenticated("the bearer token is not a JWT") from None
    alg, typ, kid = header.get("alg"), header.get("typ"), header.get("kid")
    if not isinstance(alg, str) or alg not in algorithms:
        raise Unauthenticated(f"token algorithm {_shown(alg)} is not accepted")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise Unauthenticated("the bearer token is not an access token (typ must be at+jwt)")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("the token names no key of the provider (kid)")
    if "crit" in header:  # RFC 7515 §4.1.11: we understand no extension, so none is critical
        raise Unauthenticated("the token has critical header extensions the broker refuses")
    named = sorted(KEY_SOURCE_HEADERS & header.keys())
    if named:  # RFC 8725 §3.10: keys come from the provider's JWKS, never from the token
        raise Unauthenticated(f"the token names its own key ({', '.join(named)}): refused")
    return header


def _client_id(claims: dict) -> str:
    """RFC 9068 §2.2: every access token names the client it was issued to; an `azp`, when a
    provider adds one, names the same client."""
    client_id = claims.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise Unauthenticated("the bearer token names no client (client_id)")
    if "azp" in claims and claims["azp"] != client_id:
        raise Unauthenticated("the bearer token's azp is not its client_id")
    return client_id


def _shown(value: object) -> str:
    """A value from a token, safe to put in a message and a header: short and ASCII."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def principal_from_claims(claims: dict, groups_claim: str, kind: str = "human") -> Principal:
    """Map verified claims (of an access token or an ID token) to a Principal."""
    groups = claims.get(groups_claim) or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise Unauthenticated(f"the {groups_claim!r} claim must be a list of names")
    return Principal(
        issuer=claims["iss"],
        subject=str(claims["sub"]),
        kind=kind,
        name=str(claims.get("name") or claims.get("preferred_username") or ""),
        email=str(claims.get("email") or ""),
        # Only a JSON true: "true" or 1 from a sloppy provider does not make an address verified.
        email_verified=claims.get("email_verified") is True,
        groups=tuple(groups),
        client_id=str(claims.get("client_id") or claims.get("azp") or ""),
        extra=extra_claims(claims, exclude=STANDARD_CLAIMS | PROTOCOL_CLAIMS | {groups_claim}),
    )
