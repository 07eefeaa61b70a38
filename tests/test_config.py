"""Settings are checked once, when they are loaded: a wrong value is one ConfigError naming the
key, whatever the command; only what serving alone needs waits for check_service_settings."""

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
