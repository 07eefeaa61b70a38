"""Session-wide real processes: an OpenBao dev server, the OIDC provider and PostgreSQL
(started by scripts/launchers.py).
Each starts once per test session in its own temporary directory and is stopped at the end."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import psycopg
import pytest
from werkzeug.serving import make_server

from broker import create_app
from broker.web.serving import RequestHandler
from scripts.launchers import (
    DATABASE_READONLY_POLICY,
    OidcProvider,
    OpenBao,
    Postgres,
    configure_database_engine,
    configure_ssh_engine,
    configure_transit_engine,
    free_port,
    provider_config,
    user_access_token,
)

pytest.register_assert_rewrite("tests.helpers")

from tests.helpers import (  # noqa: E402 (after the rewrite hook)
    EXPIRING_AGENT,
    STORE,
    UI_POLICY,
    broker_settings,
    drop_test_databases,
    store_at,
    use_postgres,
)

# What the tests' entitlements grant: the token role admits these and nothing else.
BROKER_TOKEN_POLICIES = ["jit-test-read", "jit-test-admin", DATABASE_READONLY_POLICY]


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """The root token stays with the fixtures; every broker runs with openbao.broker_token, which
    holds only the broker's shipped least-privilege policy."""
    server = OpenBao.start(workdir=tmp_path_factory.mktemp("openbao"))
    server.make_broker_token(BROKER_TOKEN_POLICIES)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def broker_vault(openbao):
    """An hvac client holding the broker's own token (to prove what it can and cannot do)."""
    return openbao.client(openbao.broker_token)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A throwaway cluster, or the server JIT_TEST_POSTGRES_DSN names."""
    server = Postgres.from_env_or_start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def store_under_test(request):
    """JIT_TEST_STORE=postgres: every broker and store of the suite on the test PostgreSQL, each
    test's on a database of its own (tests.helpers.store_url); dropped at the end."""
    if STORE != "postgres":
        yield STORE
        return
    use_postgres(request.getfixturevalue("postgres").dsn)
    yield STORE
    drop_test_databases()


@pytest.fixture
def make_store(tmp_path):
    """A store under test of this test's own (`name` tells several apart), closed at the end."""
    made = []

    def make(name: str = "broker.db"):
        store = store_at(tmp_path / name)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture(scope="session")
def database_engine(openbao, postgres):
    """OpenBao's database engine at database/ against the test PostgreSQL, role readonly."""
    client = openbao.client()
    configure_database_engine(client, postgres)
    return client


@pytest.fixture(scope="module")
def inventory(postgres):
    """A table the readonly role's creation statements grant SELECT on (made before any user)."""
    with psycopg.connect(postgres.dsn, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS inventory (item text)")
        admin.execute("DELETE FROM inventory")
        admin.execute("INSERT INTO inventory VALUES ('spanner')")


@pytest.fixture(scope="session")
def ssh_engine(openbao):
    """OpenBao's SSH engine at ssh/ with a generated CA key and role jit-users."""
    client = openbao.client()
    configure_ssh_engine(client)
    return client


@pytest.fixture(scope="session")
def broker_port() -> int:
    """The port the broker under test will listen on; the provider knows its redirect URI."""
    return free_port()


@pytest.fixture(scope="session")
def ui_broker_port() -> int:
    """The port of the browser tests' broker (its own policy); the provider knows it too."""
    return free_port()


@pytest.fixture(scope="session")
def oidc_client_secret() -> str:
    """The broker web client's secret (the ci-agent's is launchers.agent_secret of it)."""
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def oidc_provider(
    tmp_path_factory: pytest.TempPathFactory,
    broker_port: int,
    ui_broker_port: int,
    oidc_client_secret: str,
) -> Iterator[OidcProvider]:
    config = provider_config(
        free_port(), f"http://127.0.0.1:{broker_port}/auth/callback", oidc_client_secret
    )
    web_client = config["clients"][0]  # the broker's: the browser tests' broker logs in too
    web_client["redirect_uris"].append(f"http://127.0.0.1:{ui_broker_port}/auth/callback")
    web_client["post_logout_redirect_uris"].append(f"http://127.0.0.1:{ui_broker_port}/")
    # A client whose tokens live two seconds, to test expiry with a token the provider signed.
    config["clients"].append(
        {
            "client_id": EXPIRING_AGENT,
            "client_secret": oidc_client_secret,
            "grant_types": ["client_credentials"],
            "redirect_uris": [],
        }
    )
    config["access_token_ttls"] = {EXPIRING_AGENT: 2}
    # More approvers than the demo has, for separation-of-duties and race tests.
    config["accounts"]["dave"] = {
        "email": "dave@example.com",
        "name": "Dave Security",
        "groups": ["security"],
    }
    config["accounts"]["erin"] = {
        "email": "erin@example.com",
        "name": "Erin DBA",
        "groups": ["security", "dba"],
    }
    # Bob's second account: another subject, the same verified email (written differently).
    config["accounts"]["bob2"] = {
        "email": "Bob@Example.com",
        "name": "Bob Second Account",
        "groups": ["security"],
    }
    # Claims Bob's address, but the provider never verified it: not Bob for the broker.
    config["accounts"]["bob-unverified"] = {
        "email": "bob@example.com",
        "email_verified": False,
        "name": "Bob Unverified",
        "groups": ["security"],
    }
    provider = OidcProvider.start(config, tmp_path_factory.mktemp("oidc"))
    yield provider
    provider.stop()


# --- the broker itself, against the real OpenBao and OIDC provider above -------------------------


@pytest.fixture(scope="session")
def vault_setup(openbao):
    client = openbao.client()
    client.sys.create_or_update_policy(
        "jit-test-read", 'path "secret/data/test/*" { capabilities = ["read"] }'
    )
    client.sys.create_or_update_policy(
        "jit-test-admin",
        'path "secret/data/test/*" { capabilities = ["create", "read", "update"] }',
    )
    client.secrets.kv.v2.create_or_update_secret("test/app", {"password": "s3cret"})
    configure_transit_engine(client)  # every broker signs access tokens with its key
    return client


class LiveBroker:
    """The broker app served over real HTTP on the port the provider's redirect URI names."""

    def __init__(self, app, port: int):
        self.app = app
        self.url = f"http://127.0.0.1:{port}"
        self.server = make_server(
            "127.0.0.1", port, app, threaded=True, request_handler=RequestHandler
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def grants(self):
        return self.app.extensions["jit"].grants

    def stop(self):
        self.server.shutdown()
        self.app.extensions["jit"].stop()


@pytest.fixture(scope="session")
def broker(tmp_path_factory, openbao, oidc_provider, broker_port, oidc_client_secret, vault_setup):
    settings = broker_settings(
        tmp_path_factory.mktemp("broker"), openbao, oidc_provider, broker_port, oidc_client_secret
    )
    live = LiveBroker(create_app(settings), broker_port)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def ui_broker(
    tmp_path_factory, openbao, oidc_provider, ui_broker_port, oidc_client_secret, vault_setup
):
    """A live broker for the browser tests, under UI_POLICY (approvals, extension, break-glass)."""
    settings = broker_settings(
        tmp_path_factory.mktemp("ui-broker"),
        openbao,
        oidc_provider,
        ui_broker_port,
        oidc_client_secret,
        policy_text=UI_POLICY,
    )
    live = LiveBroker(create_app(settings), ui_broker_port)
    yield live
    live.stop()


@pytest.fixture
def make_app(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, vault_setup):
    """A broker of its own (fresh database, no reaper thread unless asked) with settings changed."""

    built = []

    def build(**overrides):
        overrides["reaper"] = {"enabled": False, **overrides.get("reaper", {})}
        app = create_app(
            broker_settings(
                tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret, **overrides
            )
        )
        built.append(app)
        return app

    yield build
    for app in built:
        app.extensions["jit"].stop()


@pytest.fixture
def api_for(tokens):
    """An API caller for an app: real bearer tokens from the provider, Flask's test client."""

    def for_app(app):
        client = app.test_client()

        def call(method, path, body=None, user="alice"):
            headers = {"Authorization": f"Bearer {tokens(user)}"}
            return client.open(path, method=method, json=body, headers=headers)

        return call

    return for_app


@pytest.fixture(scope="session")
def tokens(oidc_provider):
    """Real access tokens from the provider, one login per user for the session."""
    cache: dict[str, str] = {}

    def token_for(username: str) -> str:
        if username not in cache:
            cache[username] = user_access_token(oidc_provider, username)
        return cache[username]

    return token_for


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.rep_call`...), for fixtures that act on a
    failure (the browser tests save a screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
