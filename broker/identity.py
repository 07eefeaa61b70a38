"""Who is asking. Turns a bearer JWT (RFC 9068 access token) or the claims of a verified OIDC login
into a Principal. Pinned algorithms, exact issuer and audience, required claims (RFC 8725)."""

from __future__ import annotations

import threading
import time

import jwt
import requests

from .errors import ProviderUnavailable, Unauthenticated
from .models import STANDARD_CLAIMS, Principal, extra_claims

REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
ACCESS_TOKEN_TYPES = {"at+jwt", "application/at+jwt"}
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

    def __init__(self, issuer: str, timeout: float = 5):
        self.issuer = issuer
        self.timeout = timeout
        self._document: dict | None = None
        self._lock = threading.Lock()

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


class ProviderKeys:
    """The provider's signing keys (JWKS), parsed by pyjwt. Fetched again when a token names a
    key not seen yet (rotation), but at most once per `cooldown` so junk kids cannot hammer it."""

    def __init__(self, metadata: ProviderMetadata, cooldown: float = 30, timeout: float = 5):
        self.metadata = metadata
        self.cooldown = cooldown
        self.timeout = timeout
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -cooldown
        self._lock = threading.Lock()

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched_at >= self.cooldown:
                self._fetch()
            return self._keys.get(kid)

    def _fetch(self) -> None:
        try:
            response = requests.get(self.metadata.get()["jwks_uri"], timeout=self.timeout)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json())
        except (requests.RequestException, ValueError, jwt.PyJWKSetError) as exc:
            raise ProviderUnavailable(f"cannot fetch the provider's signing keys: {exc}") from exc
        self._keys = {key.key_id: key for key in keys.keys if key.key_id}
        self._fetched_at = time.monotonic()


class BearerVerifier:
    def __init__(
        self,
        metadata: ProviderMetadata,
        audience: str,
        algorithms: list[str],
        groups_claim: str = "groups",
        leeway: int = 30,
    ):
        self.metadata = metadata
        self.keys = ProviderKeys(metadata)
        self.audience = audience
        self.algorithms = list(algorithms)
        self.groups_claim = groups_claim
        self.leeway = leeway

    def verify(self, token: str) -> Principal:
        """Return the Principal the token vouches for, or raise Unauthenticated saying why."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise Unauthenticated("the bearer token is not a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthenticated(f"token algorithm {header.get('alg')!r} is not accepted")
        if str(header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
            raise Unauthenticated("the bearer token is not an access token (typ must be at+jwt)")
        key = self.keys.get(header.get("kid"))
        if key is None:
            raise Unauthenticated("the token was not signed by a key of the provider")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.metadata.issuer,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the bearer token is not valid: {exc}") from None
        client_id = str(claims.get("client_id") or "")
        # A client acting for itself (client credentials: sub == client_id, RFC 9068 §2.2) is an
        # agent; a token obtained by someone logging in is a human's.
        kind = "agent" if client_id and claims["sub"] == client_id else "human"
        return principal_from_claims(claims, self.groups_claim, kind)


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
        groups=tuple(groups),
        client_id=str(claims.get("client_id") or claims.get("azp") or ""),
        extra=extra_claims(claims, exclude=STANDARD_CLAIMS | PROTOCOL_CLAIMS | {groups_claim}),
    )
