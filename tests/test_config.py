"""Settings are checked once, when they are loaded: a wrong value is one ConfigError naming the
key, whatever the command; only what serving alone needs waits for check_service_settings."""

import pytest

from broker.config import check_service_settings, load_settings
from broker.errors import ConfigError


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
