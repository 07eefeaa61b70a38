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
from datetime import datetime, timedelta
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
from ..models import isoformat, parse_time, utcnow

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
    """What transit says of the signing key: its newest version, the public key and creation
    time of every version it still keeps (those not older than `min_decryption_version`), and
    the oldest version it may still sign with (`min_encryption_version`; 0: any)."""

    latest: int
    public: dict[int, EllipticCurvePublicKey]
    created: dict[int, datetime]
    min_encryption: int = 0

    def signing_version(self, now: datetime, publish_delay: float) -> int:
        """The version to sign with at `now`: the newest one published at least `publish_delay`
        seconds ago, so every verifier can have learnt its key by the time a token names it.
        When none is that old (a new key, or the operator retired the older ones with
        `min_encryption_version`, as after a leak), the oldest version transit still signs with."""
        usable = [v for v in self.public if v >= self.min_encryption]
        ready = [v for v in usable if (now - self.created[v]).total_seconds() >= publish_delay]
        return max(ready) if ready else min(usable)


class TokenSigner:
    """Signs with `<mount>/sign/<key>` and reads `<mount>/keys/<key>`; nothing else (the broker's
    OpenBao policy grants exactly these two). Rotation is the operator's: a transit key rotation.

    A new version is published at once but signs only `publish_delay` seconds after transit made
    it (default 120: this signer's `keys_ttl`, a shared cache's JWKS max-age and a verifier's
    refetch cooldown), so a running tool never meets a `kid` it cannot learn yet.

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
        publish_delay: float = 120,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.client = client
        self.issuer = issuer
        self.mount = mount
        self.key_name = key_name
        self.keys_ttl = keys_ttl
        self.publish_delay = publish_delay
        self.clock = clock
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._read: tuple[float, KeyVersions] | None = None

    def kid(self, version: int) -> str:
        """The `kid` of a key version: the transit key's name and the version, e.g. `...-v3`."""
        return f"{self.key_name}-v{version}"

    def issue(self, claims: Mapping[str, Any]) -> SignedToken:
        """An access token (`typ: at+jwt`, ES256) carrying `claims` and `iss` = this issuer, signed
        by the key's signing version (`KeyVersions.signing_version`); returns it with its `kid`.
        `claims` must hold the RFC 9068 claims (exp, aud, sub, client_id, iat, jti) as JSON
        values, and no other `iss`. Raises SigningKeyUnavailable (503) when the key is missing or
        not ES256, VaultUnavailable when OpenBao cannot be reached."""
        missing = [name for name in REQUIRED_CLAIMS if name not in claims]
        if missing:
            raise ValueError(f"an access token needs the claims {missing}")
        if claims.get("iss", self.issuer) != self.issuer:
            raise ValueError(f"an access token's iss must be {self.issuer}")
        payload = {**claims, "iss": self.issuer}
        version = self.signing_version()
        try:
            return self._sign(payload, version)
        except (VaultRejected, VaultUnavailable):
            # The cached version may have been retired since (min_encryption_version raised;
            # OpenBao answers that with a 500): once more, if transit now names another version.
            fresh = self.signing_version(fresh=True)
            if fresh == version:
                raise
            return self._sign(payload, fresh)

    def signing_version(self, fresh: bool = False) -> int:
        """The key version a token signed now carries."""
        return self.versions(fresh).signing_version(self.wall_clock(), self.publish_delay)

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
        """For /readyz (deep): whether the key is there and fit to sign with. Never raises."""
        try:
            versions = self.versions(fresh=True)
        except BrokerError as exc:  # missing, not ES256, OpenBao refused or unreachable
            return {"ok": False, "error": exc.detail}
        signing = versions.signing_version(self.wall_clock(), self.publish_delay)
        check = {
            "ok": True,
            "key": self.kid(signing),
            "published": [self.kid(version) for version in sorted(versions.public)],
        }
        if versions.latest != signing:  # rotated lately: published, not yet signing
            starts = versions.created[versions.latest] + timedelta(seconds=self.publish_delay)
            check["next_key"] = {"kid": self.kid(versions.latest), "signs_from": isoformat(starts)}
        return check

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
        created: dict[int, datetime] = {}
        for version, key in (data.get("keys") or {}).items():
            loaded = load_pem_public_key(key["public_key"].encode())
            if not isinstance(loaded, EllipticCurvePublicKey) or not isinstance(
                loaded.curve, SECP256R1
            ):
                raise SigningKeyUnavailable(f"version {version} of {path} is not a P-256 key")
            public[int(version)] = loaded
            created[int(version)] = _transit_time(key.get("creation_time", ""), path)
        latest = int(data["latest_version"])
        if latest not in public:
            raise SigningKeyUnavailable(f"the latest version of {path} has no public key")
        min_encryption = int(data.get("min_encryption_version") or 0)
        if not any(version >= min_encryption for version in public):
            raise SigningKeyUnavailable(f"{path} keeps no version it may still sign with")
        return KeyVersions(latest, public, created, min_encryption)

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


def _transit_time(text: object, path: str) -> datetime:
    """A key version's creation time as transit writes it (RFC 3339, nanoseconds)."""
    try:
        if not isinstance(text, str):
            raise TypeError
        return parse_time(text)
    except (TypeError, ValueError):
        raise SigningKeyUnavailable(f"{path} names no readable creation time") from None


def _canonical(part: Mapping[str, Any]) -> bytes:
    return json.dumps(part, separators=(",", ":"), sort_keys=True).encode()
