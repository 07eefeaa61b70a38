"""Signs the broker's JWT access tokens (RFC 9068, ES256) with a key held in OpenBao's transit
engine, and publishes that key's public versions as a JWK Set. The private key never leaves
OpenBao: pyjwt's helpers encode the header and payload, transit signs the signing input. It checks
that the claims a token must carry are there, but never decides what they say (the token endpoint
does)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import hvac
import hvac.exceptions
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm
from jwt.utils import base64url_decode, base64url_encode

from ..backends.vault import translate_errors
from ..errors import BrokerError, SigningKeyUnavailable, VaultRejected, VaultUnavailable

KEY_TYPE = "ecdsa-p256"  # transit's name for a P-256 ECDSA key: ES256 (RFC 7518 §3.4)
ALGORITHM = "ES256"
# RFC 9068 §2.1: tells an access token from an ID token (RFC 8725 §3.11)
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret
# RFC 9068 §2.2 requires these besides `iss`, which the signer sets itself (it is the issuer).
REQUIRED_CLAIMS = ("exp", "aud", "sub", "client_id", "iat", "jti")
SIGNATURE_BYTES = 64  # ES256: r || s, 32 bytes each (RFC 7518 §3.4)


class SignedToken(NamedTuple):
    """A signed access token and the `kid` of the key version that signed it."""

    token: str
    kid: str


@dataclass(frozen=True)
class KeyVersions:
    """What transit says of the signing key: the version it signs with now, and the public key of
    every version it still keeps (those not older than `min_decryption_version`)."""

    latest: int
    public: dict[int, EllipticCurvePublicKey]


class TokenSigner:
    """Signs with `<mount>/sign/<key>` and reads `<mount>/keys/<key>`; nothing else (the broker's
    OpenBao policy grants exactly these two). Rotation is the operator's: a transit key rotation.

    Which keys are published: every version transit still returns, i.e. those not older than the
    key's `min_decryption_version`. After a rotation the old version stays published, so tokens
    it signed verify until their `exp`; the operator retires it by raising
    `min_decryption_version` once the longest token lifetime has passed (README).

    The key's versions are read at most every `keys_ttl` seconds. Signing and the JWKS use the
    same read, so a token's `kid` is always in the JWKS this broker serves at that moment."""

    def __init__(
        self,
        client: hvac.Client,
        issuer: str,
        mount: str = "transit",
        key_name: str = "jit-broker-tokens",
        keys_ttl: float = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.issuer = issuer
        self.mount = mount
        self.key_name = key_name
        self.keys_ttl = keys_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._read: tuple[float, KeyVersions] | None = None

    def kid(self, version: int) -> str:
        """The `kid` of a key version: the transit key's name and the version, e.g. `...-v3`."""
        return f"{self.key_name}-v{version}"

    def issue(self, claims: Mapping[str, Any]) -> SignedToken:
        """An access token (`typ: at+jwt`, ES256) carrying `claims` and `iss` = this issuer, signed
        by the key's latest version; returns it with its `kid`. `claims` must hold the RFC 9068
        claims (exp, aud, sub, client_id, iat, jti) as JSON values, and no other `iss`. Raises
        SigningKeyUnavailable (503) when the key is missing or not ES256, VaultUnavailable when
        OpenBao cannot be reached."""
        missing = [name for name in REQUIRED_CLAIMS if name not in claims]
        if missing:
            raise ValueError(f"an access token needs the claims {missing}")
        if claims.get("iss", self.issuer) != self.issuer:
            raise ValueError(f"an access token's iss must be {self.issuer}")
        payload = {**claims, "iss": self.issuer}
        versions = self.versions()
        try:
            return self._sign(payload, versions.latest)
        except (VaultRejected, VaultUnavailable):
            # The cached version may have been retired since (min_encryption_version raised;
            # OpenBao answers that with a 500): once more, if transit now names another version.
            fresh = self.versions(fresh=True)
            if fresh.latest == versions.latest:
                raise
            return self._sign(payload, fresh.latest)

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this signer issued, when its signature (by a published version)
        and `exp` are good; None for anything else. For introspection and revocation."""
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            versions = self.versions()
            key = next((k for v, k in versions.public.items() if self.kid(v) == kid), None)
            if key is None or header.get("typ") != TOKEN_TYPE:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                options={"verify_aud": False, "require": [*REQUIRED_CLAIMS, "iss"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            return None
        return claims

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The JWK Set (RFC 7517) of every published version, newest first."""
        versions = self.versions()
        keys = []
        for version in sorted(versions.public, reverse=True):
            jwk = ECAlgorithm.to_jwk(versions.public[version], as_dict=True)
            keys.append({**jwk, "kid": self.kid(version), "use": "sig", "alg": ALGORITHM})
        return {"keys": keys}

    def versions(self, fresh: bool = False) -> KeyVersions:
        """The key's versions, read again once `keys_ttl` has passed (or when `fresh`)."""
        with self._lock:
            now = self.clock()
            if fresh or self._read is None or now - self._read[0] >= self.keys_ttl:
                self._read = (now, self._read_key())
            return self._read[1]

    def health(self) -> dict[str, Any]:
        """For /healthz (deep): whether the key is there and fit to sign with. Never raises."""
        try:
            versions = self.versions(fresh=True)
        except BrokerError as exc:  # missing, not ES256, OpenBao refused or unreachable
            return {"ok": False, "error": exc.detail}
        return {
            "ok": True,
            "key": self.kid(versions.latest),
            "published": [self.kid(version) for version in sorted(versions.public)],
        }

    @translate_errors
    def _read_key(self) -> KeyVersions:
        path = f"{self.mount}/keys/{self.key_name}"
        try:
            data = self.client.secrets.transit.read_key(self.key_name, mount_point=self.mount)[
                "data"
            ]
        except hvac.exceptions.Forbidden:
            raise SigningKeyUnavailable(
                f"the broker's OpenBao token may not read {path}: its policy (`jit vault-policy`) "
                "must name the [oauth] transit_mount and signing_key"
            ) from None
        except hvac.exceptions.InvalidPath:
            raise SigningKeyUnavailable(
                f"the token signing key {path} does not exist in OpenBao: create it with "
                f"`bao write {path} type={KEY_TYPE}`"
            ) from None
        if data.get("type") != KEY_TYPE:
            raise SigningKeyUnavailable(
                f"the token signing key {path} is of type {data.get('type')!r}, not {KEY_TYPE} "
                f"({ALGORITHM})"
            )
        public: dict[int, EllipticCurvePublicKey] = {}
        for version, key in (data.get("keys") or {}).items():
            loaded = load_pem_public_key(key["public_key"].encode())
            if not isinstance(loaded, EllipticCurvePublicKey) or not isinstance(
                loaded.curve, SECP256R1
            ):
                raise SigningKeyUnavailable(f"version {version} of {path} is not a P-256 key")
            public[int(version)] = loaded
        latest = int(data["latest_version"])
        if latest not in public:
            raise SigningKeyUnavailable(f"the latest version of {path} has no public key")
        return KeyVersions(latest=latest, public=public)

    @translate_errors
    def _sign(self, payload: Mapping[str, Any], version: int) -> SignedToken:
        kid = self.kid(version)
        header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid}
        signing_input = b".".join(base64url_encode(_canonical(part)) for part in (header, payload))
        answer = self.client.secrets.transit.sign_data(
            self.key_name,
            hash_input=base64.b64encode(signing_input).decode(),
            key_version=version,
            hash_algorithm="sha2-256",
            prehashed=False,
            # JWS marshaling: the raw r || s, base64url-encoded (RFC 7518 §3.4), not ASN.1.
            marshaling_algorithm="jws",
            mount_point=self.mount,
        )["data"]
        prefix = f"vault:v{version}:"
        signature = answer.get("signature", "")
        if not signature.startswith(prefix):
            raise VaultRejected(f"transit signed with another version than {version}")
        raw = base64url_decode(signature[len(prefix) :])
        if len(raw) != SIGNATURE_BYTES:
            raise VaultRejected("transit's signature is not a JWS ES256 signature")
        return SignedToken(f"{signing_input.decode()}.{base64url_encode(raw).decode()}", kid)


def _canonical(part: Mapping[str, Any]) -> bytes:
    return json.dumps(part, separators=(",", ":"), sort_keys=True).encode()
