"""private_key_jwt client authentication (RFC 7523 §2.2 and §3, OpenID Connect Core §9), on
authlib's JWTBearerClientAssertion, made strict the RFC 8725 way: pinned algorithms, the key
named by `kid` from the agent's registered keys only, `iss` = `sub` = the client id, `aud`
exactly the token endpoint or the issuer, a short `exp`, and a `jti` used once (`first_use`,
which records it). Every way an assertion can be wrong is an InvalidClientError; it never
decides what the agent may get."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749 import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from joserfc.jwk import import_key

from ..config import CLIENT_ASSERTION_ALGORITHMS
from ..errors import ProviderUnavailable
from ..identity import KEY_SOURCE_HEADERS, MAX_TOKEN_LENGTH
from .clients import PRIVATE_KEY_JWT, AgentClient
from .metadata import ENDPOINTS

# RFC 7523 §3 item 4 lets the server bound how far in the future `exp` may be: an assertion is
# made for one request, so a few minutes is plenty, and a stolen one is worth little longer.
MAX_ASSERTION_LIFETIME = 300
MAX_JTI = 256


def audiences_of(issuer: str) -> tuple[str, str]:
    """What an assertion's `aud` may be, exactly: the token endpoint's URL or the issuer."""
    return issuer.rstrip("/") + ENDPOINTS["token_endpoint"][0], issuer


class ClientAssertion(JWTBearerClientAssertion):
    """One check of a client assertion, for one request (cheap to build)."""

    CLIENT_AUTH_METHOD = PRIVATE_KEY_JWT

    def __init__(
        self,
        issuer: str,
        first_use: Callable[[str, str, int], bool],
        leeway: int = 30,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(leeway=leeway)
        self.audiences = audiences_of(issuer)
        self.first_use = first_use
        self.clock = clock

    def get_audiences(self) -> list[str]:
        return list(self.audiences)

    def extract_assertion(self, assertion: str) -> tuple[dict, dict]:
        """The header and claims, unverified, once the header is one the broker would use: a
        pinned algorithm (never `none`, never a MAC), a `kid`, no `crit`, no key of its own."""
        if not isinstance(assertion, str) or len(assertion) > MAX_TOKEN_LENGTH:
            raise InvalidClientError(description="the client assertion is not a JWT")
        if not assertion.isascii():
            raise InvalidClientError(description="the client assertion is not a JWT")
        headers, claims = super().extract_assertion(assertion)
        alg, kid = headers.get("alg"), headers.get("kid")
        if alg not in CLIENT_ASSERTION_ALGORITHMS:
            accepted = ", ".join(CLIENT_ASSERTION_ALGORITHMS)
            raise InvalidClientError(description=f"the assertion must be signed with {accepted}")
        if not isinstance(kid, str) or not kid:
            raise InvalidClientError(description="the assertion names no key of the client (kid)")
        if "crit" in headers:
            raise InvalidClientError(description="the assertion has critical header extensions")
        if KEY_SOURCE_HEADERS & headers.keys():
            raise InvalidClientError(description="the assertion names its own key: refused")
        return headers, claims

    def resolve_client_public_key(self, client: AgentClient) -> Callable[[Any], Any]:
        """A resolver joserfc calls with the parsed assertion: the client's key its `kid` names."""

        def resolve(token: Any) -> Any:
            header = token.headers()
            try:
                key = client.key(header["kid"])
            except ProviderUnavailable:
                raise InvalidClientError(
                    description="cannot read the client's keys at its jwks_uri"
                ) from None
            if key is None:
                raise InvalidClientError(description="the client has no key of the assertion's kid")
            if key.algorithm_name != header["alg"]:
                raise InvalidClientError(description="the assertion's algorithm is not its key's")
            return import_key(key.key, "EC" if key.algorithm_name.startswith("ES") else "RSA")

        return resolve

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> dict:
        """authlib's own, with the algorithms pinned (its default list also has HS256)."""
        try:
            token = jose_jwt.decode(assertion, resolve_key, algorithms=CLIENT_ASSERTION_ALGORITHMS)
        except (JoseError, ValueError) as exc:
            raise InvalidClientError(description="the assertion's signature is not valid") from exc
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims: dict) -> None:
        """What authlib does not check, before what it does (which ends by using up the jti)."""
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) == 1:
            aud = aud[0]
        if not isinstance(aud, str) or aud not in self.audiences:
            raise InvalidClientError(
                description=f"the assertion's aud must be exactly {self.audiences[0]} "
                f"or {self.audiences[1]}"
            )
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or not _number(exp):
            raise InvalidClientError(description="the assertion must have an exp")
        issued = iat if isinstance(iat, int | float) and _number(iat) else exp
        if exp > self.clock() + MAX_ASSERTION_LIFETIME or exp - issued > MAX_ASSERTION_LIFETIME:
            raise InvalidClientError(
                description=f"the assertion may live at most {MAX_ASSERTION_LIFETIME} seconds"
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI:
            raise InvalidClientError(description="the assertion must have a jti (text)")
        super().verify_claims(claims)

    def validate_jti(self, claims: dict, jti: str) -> bool:
        """Single use: recorded until the assertion could no longer pass its exp check anyway."""
        return self.first_use(claims["sub"], jti, int(claims["exp"]) + self.leeway)


def _number(value: object) -> bool:
    """A JSON number that is a time: not a bool, not NaN or an infinity (Python reads those)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
