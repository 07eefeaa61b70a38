"""Settings are checked once, when they are loaded: a wrong value is one ConfigError naming the
key, whatever the command; only what serving alone needs waits for check_service_settings."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from broker.config import check_service_settings, load_settings
from broker.errors import ConfigError
from tests.helpers import SigningKey


def test_settings_without_what_serving_needs_load_and_serving_names_what_is_missing():
    settings = load_settings(environ={})  # what `jit audit` reads: no issuer, no token
    with pytest.raises(ConfigError, match="oidc.issuer is required"):
        check_service_settings(settings)


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("audit", {"forward_batch": 0}, "audit.forward_batch"),
        ("audit", {"forward_timeout": -1}, "audit.forward_timeout"),
        ("audit", {"auditor_groups": "auditors"}, "audit.auditor_groups"),
        ("server", {"session_idle": 0}, "server.session_idle"),
        ("server", {"base_url": "http://broker.example"}, "server.base_url"),
        ("oidc", {"issuer": "http://idp.example"}, "oidc.issuer"),
        ("oidc", {"algorithms": ["HS256"]}, "oidc.algorithms"),
        ("oauth", {"issuer": "http://broker.example"}, "oauth.issuer"),
        ("oauth", {"issuer": "https://broker.example/jit"}, "oauth.issuer"),  # RFC 8414 §3
        ("oauth", {"issuer": "https://broker.example?x=1"}, "oauth.issuer"),
        ("oauth", {"signing_key": "../sys/policy"}, "oauth.signing_key"),
        ("oauth", {"transit_mount": ""}, "oauth.transit_mount"),
        ("storage", {"synchronous": "off"}, "storage.synchronous"),
        ("storage", {"url": "mysql://db.example/jit"}, "storage.url"),
        ("storage", {"pool_size": 0}, "storage.pool_size"),
        ("oauth", {"key_publish_delay": -1}, "oauth.key_publish_delay"),
        ("reaper", {"removal_workers": 0}, "reaper.removal_workers"),
        ("server", {"workers": 0}, "server.workers"),
        ("server", {"log_format": "xml"}, "server.log_format"),
        ("cli", {"client_id": "jit cli"}, "cli.client_id"),
        ("cli", {"scopes": "email groups"}, "cli.scopes"),
        ("cli", {"vault_addr": "bao.internal:8200"}, "cli.vault_addr"),
    ],
)
def test_a_wrong_value_is_refused_when_loaded_naming_its_key(section, values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(overrides={section: values}, environ={})


@pytest.mark.parametrize(
    "url", ["hooks.slack.com/services/s3cr3t", "ftp://example.com/s3cr3t", "http://h:x/s3cr3t"]
)
def test_a_webhook_url_that_is_not_http_is_refused_when_loaded_without_echoing_it(url):
    with pytest.raises(ConfigError, match=r"notify\.webhook_url") as refused:
        load_settings(overrides={"notify": {"webhook_url": url}}, environ={})
    assert "s3cr3t" not in str(refused.value)


def test_a_wrong_value_from_the_environment_is_refused_too():
    with pytest.raises(ConfigError, match=r"audit\.forward_batch"):
        load_settings(environ={"JIT_AUDIT_FORWARD_BATCH": "0"})


def test_the_access_token_issuer_defaults_to_the_base_url():
    settings = load_settings(overrides={"server": {"base_url": "https://jit.example/"}}, environ={})
    assert settings.oauth_issuer == "https://jit.example"
    assert (settings.oauth["transit_mount"], settings.oauth["signing_key"]) == (
        "transit",
        "jit-broker-tokens",
    )


EC_KEY = SigningKey("agent-1", "ES256").jwk()
RSA_KEY = SigningKey("agent-2", "RS256").jwk()


def test_private_key_jwt_clients_load_from_toml(tmp_path):
    """[oauth.clients."<client id>"]: a jwks_uri, inline keys, or both."""
    config = tmp_path / "jit.toml"
    x, y = EC_KEY["x"], EC_KEY["y"]
    config.write_text(
        '[oauth.clients."ci-agent"]\n'
        'jwks_uri = "https://agents.example/ci-agent/jwks.json"\n'
        '[oauth.clients."build-bot"]\n'
        f'jwks = {{ keys = [{{ kty = "EC", crv = "P-256", kid = "k1", x = "{x}", y = "{y}" }}] }}\n'
    )
    clients = load_settings(config, environ={}).oauth["clients"]
    assert clients["ci-agent"] == {"jwks_uri": "https://agents.example/ci-agent/jwks.json"}
    assert clients["build-bot"]["jwks"]["keys"][0]["kid"] == "k1"


@pytest.mark.parametrize(
    ("clients", "says"),
    [
        ("ci-agent", "oauth.clients must be a table"),
        ({"ci-agent": "https://agents.example/jwks"}, "must be a table with jwks_uri"),
        ({"ci-agent": {}}, "needs jwks_uri or jwks"),
        ({"ci-agent": {"jwks_url": "https://a.example"}}, "unknown setting jwks_url"),
        ({"ci-agent": {"jwks_uri": "http://agents.example/jwks"}}, "must use https://"),
        ({"ci-agent": {"jwks_uri": "agents.example/jwks"}}, "https:// URL with a host"),
        ({"ci-agent": {"jwks_uri": 7}}, "jwks_uri must be a URL"),
        ({"ci-agent": {"jwks": {"keys": []}}}, "must be a JWK Set"),
        ({"ci-agent": {"jwks": [EC_KEY]}}, "must be a JWK Set"),
        ({"ci-agent": {"jwks": {"keys": [dict(EC_KEY, kid="")]}}}, "needs a kid"),
        ({"ci-agent": {"jwks": {"keys": [EC_KEY, EC_KEY]}}}, "needs a kid of its own"),
        ({"ci-agent": {"jwks": {"keys": [dict(EC_KEY, d="secret")]}}}, "holds a private key"),
        ({"ci-agent": {"jwks": {"keys": [dict(EC_KEY, x="AAAA")]}}}, "not a usable public key"),
        ({"ci-agent": {"jwks": {"keys": [dict(EC_KEY, alg="ES384")]}}}, "ES384 is not accepted"),
        ({"ci-agent": {"jwks": {"keys": [dict(RSA_KEY, alg="PS256")]}}}, "PS256 is not accepted"),
        (
            {"ci-agent": {"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}}},
            "is not accepted",
        ),
        ({"": {"jwks_uri": "https://a.example/jwks"}}, "a client id is 1 to 200"),
    ],
)
def test_a_wrong_private_key_jwt_client_is_refused_when_loaded(clients, says):
    with pytest.raises(ConfigError, match="oauth.clients") as refused:
        load_settings(overrides={"oauth": {"clients": clients}}, environ={})
    assert says in str(refused.value)


def test_a_loopback_jwks_uri_may_be_http():
    clients = {"ci-agent": {"jwks_uri": "http://127.0.0.1:8400/jwks"}}
    settings = load_settings(overrides={"oauth": {"clients": clients}}, environ={})
    assert settings.oauth["clients"] == clients


def test_a_short_rsa_key_is_refused():
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    short = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    key = dict(RSAAlgorithm.to_jwk(short, as_dict=True), kid="short")
    with pytest.raises(ConfigError, match="1024 bits is too short"):
        load_settings(
            overrides={"oauth": {"clients": {"a": {"jwks": {"keys": [key]}}}}}, environ={}
        )


def test_the_store_is_sqlite_unless_a_postgresql_url_is_given(tmp_path):
    from broker.store import SqliteStore, open_store
    from broker.store.postgres import PostgresStore

    sqlite = load_settings(overrides={"server": {"data_dir": str(tmp_path)}}, environ={})
    store = open_store(sqlite)
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "broker.db"
    url = "postgresql://jit:s3cr3t@db.example/jit"
    postgres = load_settings(environ={"JIT_STORAGE_URL": url, "JIT_STORAGE_POOL_SIZE": "4"})
    store = open_store(postgres)  # connects only when first used
    assert isinstance(store, PostgresStore) and store.pool_size == 4
    assert "s3cr3t" not in repr(store)


def test_a_secret_file_made_by_many_at_once_is_one_key_read_whole(tmp_path):
    """gunicorn's workers (or replicas on one directory) start together on a new data directory:
    each gets the same key, and no one fails because another made it first."""
    settings = load_settings(overrides={"server": {"data_dir": str(tmp_path)}}, environ={})
    start = threading.Barrier(16)

    def make():
        start.wait()
        return settings.secret_file("audit-hmac.key")

    with ThreadPoolExecutor(16) as pool:
        keys = set(pool.map(lambda _: make(), range(16)))
    assert len(keys) == 1 and len(next(iter(keys))) == 32
    assert (tmp_path / "audit-hmac.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["audit-hmac.key"]  # no partial files left
