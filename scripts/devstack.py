"""Start the whole stack on localhost for scripts/dev: OpenBao (with a database engine over a
throwaway PostgreSQL, an SSH CA and the transit key that signs tools' tokens), the OIDC provider
with demo users, agent and tool clients, an example config and policy, the example MCP tool at the
resource URI the policy's [tools.github] names, then the broker. Ctrl-C (or SIGTERM) stops all of
it.

`scripts/dev token USER`, while the stack runs, prints an API access token for a demo user;
`scripts/dev secret CLIENT` the client secret of ci-agent or github-tool."""

from __future__ import annotations

import logging
import secrets
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from scripts.launchers import (  # noqa: E402
    AGENT_CLIENT_ID,
    CLI_CLIENT_ID,
    DATABASE_READONLY_POLICY,
    TOOL_CLIENT_ID,
    LoginFailed,
    McpTool,
    OidcProvider,
    OpenBao,
    Postgres,
    agent_secret,
    configure_database_engine,
    configure_ssh_engine,
    configure_transit_engine,
    demo_accounts,
    provider_config,
    tool_secret,
    user_access_token,
)

BROKER_URL = "http://localhost:5000"
VAULT_PORT, OIDC_PORT = 8200, 9000
STATE = ROOT / "var" / "dev"
EXAMPLE = ROOT / "scripts" / "example"
EXAMPLE_TOOL = "github"  # the policy's [tools.github]: scripts/dev serves it with the example


def example_tool_resource(policy: Path = EXAMPLE / "policy.toml") -> str:
    """The resource URI the example policy gives its tool: where scripts/dev serves the example
    MCP server, so the two cannot disagree."""
    with policy.open("rb") as file:
        return tomllib.load(file)["tools"][EXAMPLE_TOOL]["resource"]


def configure_vault(bao: OpenBao, postgres: Postgres) -> None:
    """The Vault policies the example entitlements grant, a secret worth reading, the database
    engine over `postgres` (with a table worth reading), the SSH CA and the transit key that signs
    access tokens for tools; then the broker's own token, with only its least-privilege policy
    (its token role admits the example's policies)."""
    client = bao.client()
    example_policies = []
    for hcl in sorted((EXAMPLE / "vault").glob("*.hcl")):
        client.sys.create_or_update_policy(hcl.stem, hcl.read_text())
        example_policies.append(hcl.stem)
    client.secrets.kv.v2.create_or_update_secret("app/database", {"password": "hunter2"})
    import psycopg

    with psycopg.connect(postgres.dsn) as db:
        db.execute("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, item text NOT NULL)")
        if not db.execute("SELECT 1 FROM orders LIMIT 1").fetchone():
            db.execute("INSERT INTO orders (item) VALUES ('keyboard'), ('monitor')")
    configure_database_engine(client, postgres)
    configure_ssh_engine(client)
    configure_transit_engine(client)
    bao.make_broker_token([*example_policies, DATABASE_READONLY_POLICY])


def write_config(
    bao: OpenBao, provider: OidcProvider, postgres: Postgres, client_secret: str
) -> Path:
    policy = STATE / "policy.toml"
    # Where `jit exec app-db-readonly` connects (PGHOST, PGPORT, PGDATABASE): this run's cluster.
    connect = f"postgresql://{postgres.host}:{postgres.port}/{postgres.dbname}"
    policy.write_text(
        (EXAMPLE / "policy.toml")
        .read_text()
        .replace('role = "readonly"', f'role = "readonly"\nconnect = "{connect}"', 1)
    )
    config = STATE / "config.toml"
    config.write_text(f"""\
# Written by scripts/dev; every run starts a fresh OpenBao and provider, so it is rewritten.
[server]
base_url = "{BROKER_URL}"
host = "localhost"
port = 5000
data_dir = "."

[oidc]
issuer = "{provider.issuer}"
client_id = "jit-broker"
client_secret = "{client_secret}"
api_audience = "urn:jit-broker:api"

[vault]
addr = "{bao.addr}"
token = "{bao.broker_token}"  # only the policy `jit vault-policy` prints, never the root token

[policy]
path = "policy.toml"

[audit]
# Every signed checkpoint also goes to this KV v2 secret, as a new version the broker cannot
# take back: `jit -c var/dev/config.toml audit verify --witness openbao` holds the log to it.
witness_kv = "secret/jit-broker/audit-checkpoints"

[cli]
client_id = "{CLI_CLIENT_ID}"  # `jit login --broker {BROKER_URL}` logs in as this public client

[postgres]
dsn = "{postgres.dsn}"
""")
    config.chmod(0o600)
    return config


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    STATE.mkdir(parents=True, exist_ok=True)
    # Grants of a previous OpenBao mean nothing now. The log's checkpoint copies go with the log:
    # kept, they would rightly say the new log is not the one they signed.
    for name in ("broker.db", "broker.db-wal", "broker.db-shm", "audit-checkpoints.jsonl"):
        (STATE / name).unlink(missing_ok=True)
    client_secret = secrets.token_urlsafe(24)
    bao = OpenBao.start(root_token=secrets.token_urlsafe(16), port=VAULT_PORT, workdir=STATE)
    provider = postgres = tool = None
    try:
        # The database entitlement's target: a throwaway cluster, or JIT_TEST_POSTGRES_DSN's server.
        postgres = Postgres.from_env_or_start()
        configure_vault(bao, postgres)
        provider = OidcProvider.start(
            provider_config(
                OIDC_PORT,
                f"{BROKER_URL}/auth/callback",
                client_secret,
                post_logout_redirect_uri=f"{BROKER_URL}/",
            ),
            STATE,
        )
        config = write_config(bao, provider, postgres, client_secret)

        from broker import create_app
        from broker.cli import run_server
        from broker.config import load_settings

        app = create_app(load_settings(config))
        # The example tool: the broker's tokens for [tools.github] only; asks the broker's
        # introspection as the github-tool client, so a released task is refused at once.
        tool = McpTool.start(
            BROKER_URL,
            f"{BROKER_URL}/.well-known/jwks.json",
            STATE,
            resource=example_tool_resource(),
            introspect=f"{BROKER_URL}/oauth/introspect",
            provider=provider.issuer,
            audience=provider.api_resource,
            client_secret=tool_secret(client_secret),
        )
        users = ", ".join(
            f"{name} ({', '.join(a['groups'])})" for name, a in demo_accounts().items()
        )
        print(
            f"""
  jit-broker      {BROKER_URL}
  OpenBao         {bao.addr}   root token: {bao.root_token}
                  (the broker's own token holds only the jit-broker policy: jit vault-policy)
  OIDC provider   {provider.issuer}
  PostgreSQL      {postgres.host}:{postgres.port}   (the app-db-readonly entitlement's users)
  example tool    {tool.resource}   (MCP, streamable HTTP; [tools.{EXAMPLE_TOOL}]; metadata:
                  {tool.metadata_url})
  agents          ci-agent (client credentials); the tool introspects as github-tool;
                  their secrets: scripts/dev secret ci-agent | github-tool
  demo agent      .venv/bin/python scripts/example/demo_agent.py   (the agent path, end to end)
  demo users      {users}; any password
  the jit CLI     .venv/bin/jit login --broker {BROKER_URL}   (then: jit ls, jit request ...,
                  jit exec app-db-readonly --reason ... -- psql -c 'table orders')
  API token       TOKEN=$(scripts/dev token alice)   (in another terminal)
  config          {config}   (jit -c {config.relative_to(ROOT)} audit verify)
  Ctrl-C stops everything.
""",
            flush=True,
        )
        run_server(app)
    except KeyboardInterrupt:
        pass
    finally:
        if tool:
            tool.stop()
        if provider:
            provider.stop()
        if postgres:
            postgres.stop()
        bao.stop()


def print_token(username: str) -> None:
    """Log in as a demo user through the running provider's own form (the CLI client's code flow
    with PKCE) and print the access token, for `curl -H "Authorization: Bearer $TOKEN"`."""
    provider = OidcProvider(None, {"issuer": f"http://127.0.0.1:{OIDC_PORT}"})
    try:
        print(user_access_token(provider, username))
    except requests.ConnectionError:
        sys.exit("scripts/dev token: the dev stack is not running; start it with scripts/dev")
    except LoginFailed:
        users = ", ".join(demo_accounts())
        sys.exit(f"scripts/dev token: {username!r} cannot log in; the demo users are {users}")


class NotRunning(Exception):
    """The dev stack has not written its config: it is not running (or never ran)."""


def client_secret_of(client_id: str) -> str:
    """The secret of a client the running dev stack registered at its provider (ci-agent,
    github-tool): derived from the web client's, which this run wrote to var/dev/config.toml."""
    derive = {AGENT_CLIENT_ID: agent_secret, TOOL_CLIENT_ID: tool_secret}
    if client_id not in derive:
        raise KeyError(client_id)
    try:
        with (STATE / "config.toml").open("rb") as file:
            web_secret = tomllib.load(file)["oidc"]["client_secret"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise NotRunning(f"no {STATE / 'config.toml'}; start the dev stack: scripts/dev") from exc
    return derive[client_id](web_secret)


def print_secret(client_id: str) -> None:
    try:
        print(client_secret_of(client_id))
    except KeyError:
        sys.exit(
            f"scripts/dev secret: the clients with a secret are {AGENT_CLIENT_ID}, {TOOL_CLIENT_ID}"
        )
    except NotRunning as exc:
        sys.exit(f"scripts/dev secret: {exc}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["token"] and len(sys.argv) == 3:
        print_token(sys.argv[2])
    elif sys.argv[1:2] == ["secret"] and len(sys.argv) == 3:
        print_secret(sys.argv[2])
    elif len(sys.argv) > 1:
        sys.exit("usage: scripts/dev [token USER | secret CLIENT]")
    else:
        main()
