"""The dev stack's example tool and the demo agent (issue 12, item 6): the tool at the resource
URI the example policy names, the provider clients the demo needs, and scripts/example/
demo_agent.py as a process against a live broker, the real provider and the example tool as a
process asking the broker's introspection: the whole path, and one line for a failing step."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from broker.backends import POLICY_KINDS
from broker.policy import load_policy
from scripts import devstack
from scripts.example import demo_agent
from scripts.launchers import (
    TOOL_CLIENT_ID,
    McpTool,
    agent_secret,
    client_credentials_token,
    free_port,
    tool_secret,
)
from tests.helpers import JwksServer, SigningKey, grants_of

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "example" / "demo_agent.py"

POLICY = """
[tools.github]
resource = "http://127.0.0.1:9/mcp"
scopes = ["issues:read", "issues:write"]

[entitlements.triage]
description = "An agent triages issues for a person"
backend = "tool_task"
max_duration = "1h"

[entitlements.triage.requesters]
groups = ["engineers"]

[entitlements.triage.task]
agents = ["ci-agent"]
tools = { github = ["issues:read"] }
"""


# --- the dev stack -------------------------------------------------------------------------------


def test_the_dev_stack_serves_the_tool_the_example_policy_names():
    policy = load_policy(ROOT / "scripts" / "example" / "policy.toml", POLICY_KINDS)
    resource = devstack.example_tool_resource()
    assert policy.tools[devstack.EXAMPLE_TOOL].resource == resource
    assert resource == "http://127.0.0.1:8300/mcp"  # loopback; not the CLI's redirect port
    # The dev stack's tool introspects as TOOL_CLIENT_ID: the policy must name it, or the broker
    # answers every introspection inactive and the demo's tool call is refused.
    assert policy.tools[devstack.EXAMPLE_TOOL].introspection_client == TOOL_CLIENT_ID


def test_the_demo_clients_secrets_are_derived_from_the_dev_config(tmp_path, monkeypatch):
    monkeypatch.setattr(devstack, "STATE", tmp_path)
    with pytest.raises(devstack.NotRunning):
        devstack.client_secret_of("ci-agent")
    (tmp_path / "config.toml").write_text('[oidc]\nclient_secret = "web-s3cret"\n')
    assert devstack.client_secret_of("ci-agent") == agent_secret("web-s3cret")
    assert devstack.client_secret_of("github-tool") == tool_secret("web-s3cret")
    with pytest.raises(KeyError):
        devstack.client_secret_of("jit-broker")


def test_the_tool_has_a_client_at_the_provider_for_introspection(oidc_provider, oidc_client_secret):
    token = client_credentials_token(
        oidc_provider, "github-tool", tool_secret(oidc_client_secret), oidc_provider.api_resource
    )
    assert token.count(".") == 2


# --- the demo agent against a live broker --------------------------------------------------------


SERVED: list = []


def serve(app):
    """The app over real HTTP on a port of its own (the person logs in with the CLI client at
    the provider, so the broker's port does not matter); stopped after the test."""
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SERVED.append(server)
    return app, f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _stop_served():
    yield
    while SERVED:
        SERVED.pop().shutdown()


@pytest.fixture
def live(make_app):
    """A broker with a task policy over real HTTP."""
    return serve(make_app(policy_text=POLICY))


def run_demo(*args):
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def test_the_demo_agent_walks_the_whole_path(make_app, oidc_provider, oidc_client_secret, tmp_path):
    """The person's task, the agent's own token, the exchange at the real /oauth/token (signed by
    OpenBao transit), list_issues over MCP at the example tool as a process, the release, and the
    tool refusing the same token at once because introspection says it is inactive."""
    resource = f"http://127.0.0.1:{free_port()}/mcp"
    # The example tool asks the broker's introspection as its own provider client.
    policy = POLICY.replace("http://127.0.0.1:9/mcp", resource).replace(
        '"issues:write"]\n', f'"issues:write"]\nintrospection_client = "{TOOL_CLIENT_ID}"\n', 1
    )
    app, url = serve(make_app(policy_text=policy))
    tool = McpTool.start(
        app.extensions["jit"].signer.issuer,
        f"{url}/.well-known/jwks.json",
        tmp_path,
        resource=resource,
        introspect=f"{url}/oauth/introspect",
        provider=oidc_provider.issuer,
        client_secret=tool_secret(oidc_client_secret),
        audience=oidc_provider.api_resource,
    )
    try:
        done = run_demo(
            "--broker",
            url,
            "--provider",
            oidc_provider.issuer,
            f"--agent-secret={agent_secret(oidc_client_secret)}",  # it may begin with "-"
            "--entitlement",
            "triage",
            "--resource",
            resource,
        )
    finally:
        tool.stop()
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(lines) == 7, done.stdout
    assert lines[0].startswith("[1] alice logs in")
    assert lines[1].startswith("[2] alice starts triage for ci-agent (github: issues:read)")
    assert lines[2].startswith("[3] ci-agent gets its own access token")
    assert lines[3].startswith(
        f"[4] ci-agent exchanges at {url}/oauth/token: a Bearer token for {resource}, "
        "scope 'issues:read', expires in "
    )
    assert lines[4] == (
        "[5] ci-agent calls list_issues over MCP: 1 issue(s): The reaper should say why"
    )
    assert lines[5] == "[6] alice releases the task: the grant is released"
    assert lines[6].startswith(
        '[7] the same token at the tool now: HTTP 401 Bearer error="invalid_token"'
    )
    assert "resource_metadata=" in lines[6]
    (grant,) = grants_of(app).store.db.execute("SELECT id, status, task_agent FROM grants")
    assert (grant["status"], grant["task_agent"]) == ("released", "ci-agent")
    kinds = [entry["type"] for entry in grants_of(app).chain(grant["id"])]
    assert "token_issued" in kinds


def test_a_failed_exchange_is_one_line_and_the_task_is_released(
    live, oidc_provider, oidc_client_secret
):
    app, url = live
    done = run_demo(
        "--broker",
        url,
        "--provider",
        oidc_provider.issuer,
        f"--agent-secret={agent_secret(oidc_client_secret)}",  # it may begin with "-"
        "--entitlement",
        "triage",
        "--resource",
        "http://127.0.0.1:9/other",  # no tool of the task
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert lines[3].startswith("[4] the token exchange: FAILED: the broker refused the exchange: ")
    assert "invalid_target" in lines[3]
    assert lines[4] == "[6] alice releases the task after the failure: the grant is released"
    (grant,) = grants_of(app).store.db.execute("SELECT id, status, task_agent FROM grants")
    assert (grant["status"], grant["task_agent"]) == ("released", "ci-agent")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--scope", "issues:write"], "[2] the task starts: FAILED: the broker refused the task: "),
        (["--user", "carol"], "[2] the task starts: FAILED: the broker refused the task: HTTP 403"),
        (["--agent-secret", "wrong"], "[3] ci-agent gets its token: FAILED: client_credentials"),
        (["--broker", "http://127.0.0.1:9"], "[2] the task starts: FAILED: cannot connect to "),
        (["--provider", "http://127.0.0.1:9"], "[1] alice logs in: FAILED: cannot connect to "),
    ],
)
def test_each_failing_step_is_one_line(live, oidc_provider, oidc_client_secret, args, says):
    app, url = live
    base = ["--broker", url, "--provider", oidc_provider.issuer, "--entitlement", "triage"]
    base += [f"--agent-secret={agent_secret(oidc_client_secret)}", "--resource", "http://x/mcp"]
    done = run_demo(*base, *args)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.stdout.splitlines()[-1 if "[3]" not in says else -2].startswith(says), done.stdout


# --- the demo agent's MCP steps against the example tool -----------------------------------------


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    key = SigningKey("transit-1", "ES256")
    jwks = JwksServer([key])
    resource = f"http://127.0.0.1:{free_port()}/mcp"
    started = McpTool.start(
        jwks.issuer, f"{jwks.issuer}/jwks", tmp_path_factory.mktemp("mcp"), resource=resource
    )
    yield jwks, key, started
    started.stop()
    jwks.stop()


def tool_token(tool, aud=None):
    jwks, key, started = tool
    return key.token(
        jwks.issuer,
        aud=aud or started.resource,
        sub="alice",
        client_id="ci-agent",
        act={"sub": "ci-agent"},
        scope="issues:read",
        jti=f"j-{time.monotonic_ns()}",
    )


def test_the_tool_is_served_at_the_resource_it_is_given(tool):
    started = tool[2]
    assert started.metadata_url.endswith("/.well-known/oauth-protected-resource/mcp")
    assert started.metadata_url.startswith(started.resource.rsplit("/mcp", 1)[0])


def test_the_demo_agent_lists_issues_with_the_sdk(tool):
    args = Namespace(resource=tool[2].resource)
    issues = demo_agent.call_tool(args, tool_token(tool))
    assert [issue["title"] for issue in issues] == ["The reaper should say why"]


def test_a_refused_mcp_call_is_one_line(tool):
    args = Namespace(resource=tool[2].resource)
    with pytest.raises(demo_agent.StepFailed) as refused:
        demo_agent.call_tool(args, tool_token(tool, aud="http://127.0.0.1:9/other"))
    assert str(refused.value).startswith("the MCP call failed: ")
    assert "\n" not in str(refused.value)


def test_the_last_step_shows_the_refusal_or_says_the_tool_does_not_introspect(tool):
    args = Namespace(resource=tool[2].resource)
    answer = demo_agent.tool_refuses(args, tool_token(tool, aud="http://127.0.0.1:9/other"))
    assert answer.startswith('HTTP 401 Bearer error="invalid_token"')
    assert "resource_metadata=" in answer
    with pytest.raises(demo_agent.StepFailed, match="still accepts the token"):
        demo_agent.tool_refuses(args, tool_token(tool))
