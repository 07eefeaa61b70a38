"""Settings from a TOML file, overridden by `JIT_<SECTION>_<KEY>` environment variables, every
value checked when they are loaded (one ConfigError naming the key). Only reads and validates:
it never builds a client nor starts anything."""

from __future__ import annotations

import os
import secrets
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import jwt

from .errors import ConfigError
from .urls import is_loopback_host, loggable_target

SYNCHRONOUS = ("normal", "full")
LOG_FORMATS = (
    "text",
    "json",
)  # [server] log_format  # [storage] synchronous: SQLite's, for the write-ahead log

DEFAULTS: dict[str, dict] = {
    "server": {
        "base_url": "http://127.0.0.1:5000",
        "host": "127.0.0.1",
        "port": 5000,
        "secret_key": "",
        "data_dir": "var",
        "session_refresh": 300,  # seconds a browser session's claims are trusted before a refresh
        "session_idle": 1800,  # a browser session unused this long ends
        "session_lifetime": 8 * 3600,  # and every browser session ends this long after login
        "metrics_token": "",  # when set, GET /metrics asks for it as a bearer token
        # `jit serve` (gunicorn): worker processes, threads each, seconds to finish on SIGTERM
        "workers": 1,
        "threads": 8,
        "graceful_timeout": 30,
        "log_format": "text",  # or "json": one object a line, with the request id
    },
    "oidc": {
        "issuer": "",
        "client_id": "",
        "client_secret": "",
        "api_audience": "",
        "algorithms": ["RS256", "ES256"],
        "groups_claim": "groups",
        "scopes": "openid email profile groups",
        "leeway": 30,
    },
    "vault": {"addr": "http://127.0.0.1:8200", "token": "", "timeout": 10},
    "policy": {"path": "policy.toml"},
    # url: "postgresql://..." for several replicas on PostgreSQL (empty: the SQLite file at
    # path, default data_dir/broker.db). synchronous (SQLite's): "normal" (a commit survives the
    # broker's crash; the last ones may roll back on power loss) or "full" (every commit synced).
    # pool_size: PostgreSQL connections per broker process. See broker/store/.
    "storage": {"path": "", "synchronous": "normal", "url": "", "pool_size": 10},
    "reaper": {
        "enabled": True,
        "retry_min": 5,
        "retry_max": 300,
        "heartbeat": 30,  # the reaper wakes at least this often; 3x stale and issuing stops
        "reconcile_every": 300,  # seconds between sweeps of what Vault holds for the broker
        "behind_after": 60,  # a deadline this many seconds overdue: /readyz says not ready
        "removal_workers": 8,  # due grants one reaper pass removes at once (each waits on Vault)
    },
    "notify": {"webhook_url": "", "timeout": 5},
    "audit": {
        # Checkpoints are signed by this OpenBao transit key (ed25519 or ecdsa-p256), which never
        # leaves OpenBao; rotation is a transit key rotation.
        "transit_mount": "transit",
        "transit_key": "jit-broker-audit",
        # The v1 Ed25519 key file of brokers before transit signing: only read, to verify the
        # checkpoints it signed (default data_dir/audit-signing.key); never made any more.
        "signing_key": "",
        "checkpoint_every": 60,  # seconds between signed checkpoints (when the log grew)
        # How late a checkpoint may be before verify calls it missing (beyond checkpoint_every).
        "checkpoint_tolerance": 120,
        # An OpenBao KV v2 secret each checkpoint is also written to, as a new version ("": off):
        # "<mount>/<path>", e.g. "secret/jit-broker/audit-checkpoints".
        "witness_kv": "",
        "auditor_groups": ["auditors"],  # who may read the review pages
        "forward_url": "",  # an HTTP endpoint that receives every entry, in order (empty: off)
        "forward_token": "",  # sent as a bearer token to forward_url
        "forward_timeout": 5,
        "forward_batch": 100,
    },
    # The broker as the authorization server for tools: its access tokens are signed by this
    # OpenBao transit key (ecdsa-p256, ES256), which never leaves OpenBao.
    "oauth": {
        "transit_mount": "transit",
        "signing_key": "jit-broker-tokens",
        "issuer": "",  # default: server.base_url
        # A rotated key version signs only this long after transit made it: every replica's
        # JWKS, a shared cache (max-age 60) and a tool's refetch cooldown (30) have it by then.
        "key_publish_delay": 120,
        # Agents that authenticate with private_key_jwt (RFC 7523): client id -> {jwks_uri, jwks}
        "clients": {},
    },
    # Only to verify that a database user is gone: read pg_roles. Never used to create users.
    "postgres": {"dsn": ""},
    # What `jit login` needs, published at GET /api/v1/cli: the CLI's public client at the
    # provider (empty: no CLI login), the scopes it asks for, and the Vault address `jit exec`
    # puts in VAULT_ADDR (default: vault.addr).
    "cli": {"client_id": "", "scopes": "openid email profile groups", "vault_addr": ""},
}


@dataclass(frozen=True)
class Settings:
    server: dict
    oidc: dict
    vault: dict
    policy: dict
    storage: dict
    reaper: dict
    notify: dict
    audit: dict
    postgres: dict
    oauth: dict
    cli: dict
    root: Path = field(default=Path("."))

    @property
    def data_dir(self) -> Path:
        return self._path(self.server["data_dir"])

    @property
    def database_path(self) -> Path:
        return self._path(self.storage["path"] or str(self.data_dir / "broker.db"))

    @property
    def signing_key_path(self) -> Path:
        return self._path(self.audit["signing_key"] or str(self.data_dir / "audit-signing.key"))

    @property
    def checkpoint_copy_path(self) -> Path:
        """Where the signed checkpoints are copied, beside the signing key, outside the database."""
        return self.signing_key_path.with_name("audit-checkpoints.jsonl")

    @property
    def policy_path(self) -> Path:
        return self._path(self.policy["path"])

    @property
    def oauth_issuer(self) -> str:
        """The `iss` of the broker's access tokens and of its RFC 8414 metadata."""
        return self.oauth["issuer"] or self.server["base_url"].rstrip("/")

    @property
    def cli_vault_addr(self) -> str:
        """The OpenBao address the CLI gives engineers' commands (VAULT_ADDR)."""
        return self.cli["vault_addr"] or self.vault["addr"]

    @property
    def redirect_uri(self) -> str:
        return self.server["base_url"].rstrip("/") + "/auth/callback"

    @property
    def post_logout_redirect_uri(self) -> str:
        """Where the provider sends the browser after logout; registered with it exactly."""
        return self.server["base_url"].rstrip("/") + "/"

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.root / path

    def secret_file(self, name: str, nbytes: int = 32) -> bytes:
        """A random key in the data directory, made on first use, readable by the owner only.
        Several processes may start together (gunicorn's workers, replicas on one directory):
        each writes a whole key to a file of its own and links it into place, so exactly one
        key wins and nobody ever reads half of one."""
        path = self.data_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)  # mode 0600
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(secrets.token_bytes(nbytes))
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(partial, path)  # fails if another process's key is in place
                except FileExistsError:
                    pass
            finally:
                os.unlink(partial)
        return path.read_bytes()


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: dict | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file, then `overrides` (for tests), then JIT_* variables; then
    every value is checked (`check_settings`)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    path = path or env.get("JIT_CONFIG")
    merged = {section: dict(values) for section, values in DEFAULTS.items()}
    root = Path.cwd()
    if path:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        _merge(merged, data, str(file))
        root = file.resolve().parent
    _merge(merged, overrides or {}, "overrides")
    for key, value in env.items():
        if key.startswith("JIT_") and key != "JIT_CONFIG":
            section, _, name = key[4:].lower().partition("_")
            if section in merged and name in merged[section]:
                merged[section][name] = _coerce(value, DEFAULTS[section][name], key)
    settings = Settings(**merged, root=root)
    check_settings(settings)
    return settings


def _merge(target: dict, data: dict, source: str) -> None:
    for section, values in data.items():
        if section not in target or not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown section [{section}]")
        for name, value in values.items():
            if name not in target[section]:
                raise ConfigError(f"{source}: unknown setting {section}.{name}")
            target[section][name] = value


def _coerce(text: str, default: object, key: str) -> object:
    if isinstance(default, bool):
        if text.lower() not in {"1", "0", "true", "false", "yes", "no"}:
            raise ConfigError(f"{key} must be true or false, not {text!r}")
        return text.lower() in {"1", "true", "yes"}
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, not {text!r}") from None
    if isinstance(default, list):
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


ASYMMETRIC_ALGORITHMS = {
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
}


def check_settings(settings: Settings) -> None:
    """Every value that has a shape to keep, whatever the command: load_settings calls it, so a
    wrong value stops the broker (and `jit audit`) at once, with one error naming the key."""
    oidc = settings.oidc
    unsafe = set(oidc["algorithms"]) - ASYMMETRIC_ALGORITHMS
    if unsafe or not oidc["algorithms"]:
        raise ConfigError(
            f"oidc.algorithms may only name asymmetric algorithms, not {sorted(unsafe)}"
        )
    if oidc["issuer"]:  # required only to serve: check_service_settings
        _check_https("oidc.issuer", oidc["issuer"])
    _check_https("server.base_url", settings.server["base_url"])
    _check_oauth(settings.oauth)
    if settings.storage["synchronous"] not in SYNCHRONOUS:
        raise ConfigError(
            f"storage.synchronous must be one of {', '.join(SYNCHRONOUS)}, "
            f"not {settings.storage['synchronous']!r}"
        )
    _check_storage(settings.storage)
    _check_sessions(settings.server)
    _check_serving(settings.server)
    _check_count("reaper.removal_workers", settings.reaper["removal_workers"])
    _check_count("reaper.behind_after", settings.reaper["behind_after"])
    _check_webhook(settings.notify)
    _check_forwarding(settings.audit)
    _check_auditor_groups(settings.audit)
    _check_cli(settings.cli)
    _check_checkpoints(settings.audit)


def check_service_settings(settings: Settings) -> None:
    """What running the broker needs besides sound values (reading the audit log needs none of
    it); called once, by the services' builder. The values are checked again: a Settings' sections
    are plain dicts, which a caller may have changed since loading."""
    oidc = settings.oidc
    for name in ("issuer", "client_id", "api_audience"):
        if not oidc[name]:
            raise ConfigError(f"oidc.{name} is required")
    if not settings.vault["token"]:
        raise ConfigError("vault.token is required (or JIT_VAULT_TOKEN)")
    check_settings(settings)


def _check_https(name: str, url: str) -> None:
    """Login codes, ID tokens and session cookies cross these URLs: plain http only on this
    machine (development), where nobody on the network can read them."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL") from None
    if not parts.hostname or parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must be an https:// URL with a host")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(
            f"{name} must use https:// (http:// is accepted only for a loopback host such as "
            "127.0.0.1 or localhost, for development)"
        )


def _check_oauth(oauth: dict) -> None:
    if oauth["issuer"]:
        _check_https("oauth.issuer", oauth["issuer"])
        parts = urlsplit(oauth["issuer"])
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            # RFC 8414 §3: the metadata of an issuer with a path lives elsewhere than the broker
            # serves it; RFC 8414 §2: no query or fragment.
            raise ConfigError("oauth.issuer must be a URL without a path, query or fragment")
    _check_oauth_clients(oauth["clients"])
    for name in ("transit_mount", "signing_key"):
        value = oauth[name]
        if (
            not isinstance(value, str)
            or not value
            or not value.replace("-", "").replace("_", "").isalnum()
        ):
            raise ConfigError(f"oauth.{name} must be a name of letters, digits, - and _")
    delay = oauth["key_publish_delay"]
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
        raise ConfigError(
            f"oauth.key_publish_delay must be a whole number of seconds >= 0, not {delay!r}"
        )


# What an agent's key may sign client assertions with (RFC 8725 §3.1: pinned, asymmetric).
CLIENT_ASSERTION_ALGORITHMS = ("ES256", "RS256")
MAX_CLIENT_ID = 200
MIN_RSA_BITS = 2048


def _check_oauth_clients(clients: object) -> None:
    """[oauth.clients."<client id>"]: where each private_key_jwt agent's public keys are, a
    `jwks_uri` (https://, or http:// on loopback) and/or inline `jwks` (public keys only, each
    with a `kid`, EC P-256 or RSA of 2048 bits or more)."""
    if not isinstance(clients, dict):
        raise ConfigError('oauth.clients must be a table of [oauth.clients."<client id>"] tables')
    for client_id, client in clients.items():
        where = f"oauth.clients.{client_id[:MAX_CLIENT_ID]!r}"
        if not client_id or len(client_id) > MAX_CLIENT_ID or not client_id.isprintable():
            raise ConfigError(f"{where}: a client id is 1 to {MAX_CLIENT_ID} printable characters")
        if not isinstance(client, dict):
            raise ConfigError(f"{where} must be a table with jwks_uri and/or jwks")
        unknown = sorted(set(client) - {"jwks_uri", "jwks"})
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]} (jwks_uri, jwks)")
        if not client.get("jwks_uri") and not client.get("jwks"):
            raise ConfigError(f"{where} needs jwks_uri or jwks: where its public keys are")
        if client.get("jwks_uri"):
            if not isinstance(client["jwks_uri"], str):
                raise ConfigError(f"{where}.jwks_uri must be a URL")
            _check_https(f"{where}.jwks_uri", client["jwks_uri"])
        if client.get("jwks"):
            _check_client_jwks(where + ".jwks", client["jwks"])


def _check_client_jwks(where: str, jwks: object) -> None:
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where} must be a JWK Set: {{ keys = [ {{ kty = ..., kid = ... }} ] }}")
    kids: set[str] = set()
    for number, key in enumerate(keys, 1):
        at = f"{where} key {number}"
        if not isinstance(key, dict):
            raise ConfigError(f"{at} must be a table (a JWK)")
        if "d" in key or "p" in key:
            raise ConfigError(f"{at} holds a private key: give the public key only")
        kid = key.get("kid")
        if not isinstance(kid, str) or not kid or kid in kids:
            raise ConfigError(f"{at} needs a kid of its own: assertions name their key by it")
        kids.add(kid)
        try:
            parsed = jwt.PyJWK(key)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{at} is not a usable public key: {exc}") from None
        if parsed.algorithm_name not in CLIENT_ASSERTION_ALGORITHMS:
            raise ConfigError(
                f"{at}: algorithm {parsed.algorithm_name} is not accepted "
                f"({', '.join(CLIENT_ASSERTION_ALGORITHMS)})"
            )
        size = getattr(parsed.key, "key_size", MIN_RSA_BITS)
        if parsed.algorithm_name == "RS256" and size < MIN_RSA_BITS:
            raise ConfigError(f"{at}: an RSA key of {size} bits is too short ({MIN_RSA_BITS})")


def _check_serving(server: dict) -> None:
    if server["log_format"] not in LOG_FORMATS:
        choices = ", ".join(LOG_FORMATS)
        raise ConfigError(
            f"server.log_format must be one of {choices}, not {server['log_format']!r}"
        )
    for name in ("workers", "threads", "graceful_timeout"):
        _check_count(f"server.{name}", server[name])


def _check_count(key: str, value: object, least: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{key} must be a whole number >= {least}, not {value!r}")


def _check_storage(storage: dict) -> None:
    url = storage["url"]
    if url and urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ConfigError("storage.url must be a postgresql:// URL (empty: the SQLite file)")
    size = storage["pool_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 1000:
        raise ConfigError("storage.pool_size must be a whole number from 1 to 1000")


def _check_sessions(server: dict) -> None:
    for name in ("session_refresh", "session_idle", "session_lifetime"):
        value = server[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"server.{name} must be a whole number of seconds, not {value!r}")


def _check_webhook(notify: dict) -> None:
    if notify["webhook_url"]:
        loggable_target(notify["webhook_url"], "notify.webhook_url")


def _check_auditor_groups(audit: dict) -> None:
    groups = audit["auditor_groups"]
    if not isinstance(groups, list | tuple | set | frozenset) or not all(
        isinstance(group, str) for group in groups
    ):
        # A bare string would become a set of its letters: groups "a", "u", ... as auditors.
        raise ConfigError(f"audit.auditor_groups must be a list of group names, not {groups!r}")


def _check_cli(cli: dict) -> None:
    """The CLI's login settings are published as they are: a wrong one would fail every
    engineer's `jit login`, so it stops the broker instead."""
    client_id, scopes = cli["client_id"], cli["scopes"]
    if not isinstance(client_id, str) or any(c.isspace() for c in client_id):
        raise ConfigError(f"cli.client_id must be a client id without spaces, not {client_id!r}")
    if not isinstance(scopes, str) or "openid" not in scopes.split():
        raise ConfigError(f"cli.scopes must be a space-separated list with openid, not {scopes!r}")
    if cli["vault_addr"]:
        loggable_target(cli["vault_addr"], "cli.vault_addr")


def _check_checkpoints(audit: dict) -> None:
    for name in ("transit_mount", "transit_key"):
        value = audit[name]
        if not isinstance(value, str) or not value.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"audit.{name} must be a name of letters, digits, - and _")
    for name in ("checkpoint_every", "checkpoint_tolerance"):
        value = audit[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"audit.{name} must be a positive number of seconds, not {value!r}")
    witness = audit["witness_kv"]
    parts = witness.split("/") if isinstance(witness, str) else [""]
    if witness and (
        len(parts) < 2
        or not all(part.replace("-", "").replace("_", "").isalnum() for part in parts)
    ):
        raise ConfigError(
            "audit.witness_kv must be <mount>/<path> of letters, digits, - and _ "
            f"(e.g. secret/jit-broker/audit-checkpoints), not {witness!r}"
        )


def _check_forwarding(audit: dict) -> None:
    if audit["forward_url"]:
        loggable_target(audit["forward_url"], "audit.forward_url")
    batch = audit["forward_batch"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"audit.forward_batch must be a whole number >= 1, not {batch!r}")
    timeout = audit["forward_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"audit.forward_timeout must be a positive number, not {timeout!r}")
