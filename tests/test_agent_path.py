"""The agent path end to end with real processes (issue 12, "Tests (real processes)"): the agent's
identity from the real OIDC provider (client credentials), the broker over HTTP signing with
real OpenBao transit, two example MCP servers as processes (tool A and tool B) that verify the
broker's tokens and ask its introspection with their own provider token, and the official `mcp`
SDK's client calling them with a token from the real /oauth/token. The processes are shared by
the module; each test starts its own task."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import anyio
import jwt
import pytest
import requests
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from werkzeug.serving import make_server

from broker import create_app
from broker.backends.tool_task import SUBJECT_TOKEN_TYPE
from broker.errors import InvalidToken
from broker.grants.exchange import jti_handle
from broker.toolauth import ToolTokenVerifier
from broker.web.serving import RequestHandler
from scripts.launchers import (
    TOOL_CLIENT_ID,
    McpTool,
    agent_secret,
    client_credentials_token,
    free_port,
    tool_secret,
)
from tests.helpers import SigningKey, broker_settings, grants_of, wait_until

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TOOL_A = f"http://127.0.0.1:{free_port()}/mcp"
TOOL_B = f"http://127.0.0.1:{free_port()}/mcp"
# A rotated key signs PUBLISH_DELAY s after transit made it; the tools refetch the JWKS on an
# unknown kid at most every JWKS_COOLDOWN s (production: 120 and 30; shorter here, same order).
PUBLISH_DELAY = 4
JWKS_COOLDOWN = 1
# ci-agent's own key, registered inline for private_key_jwt (RFC 7523).
AGENT_KEY = SigningKey("ci-agent-1", "ES256")
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
POLICY = f"""
[tools.github]
resource = "{TOOL_A}"
scopes = ["issues:read", "issues:write"]
introspection_client = "{TOOL_CLIENT_ID}"

[tools.mirror]
resource = "{TOOL_B}"
scopes = ["issues:read", "issues:write"]
introspection_client = "{TOOL_CLIENT_ID}"

[entitlements.triage]
backend = "tool_task"
max_duration = "1h"
[entitlements.triage.requesters]
groups = ["engineers"]
[entitlements.triage.task]
agents = ["ci-agent"]
tools = {{ github = ["issues:read", "issues:write"], mirror = ["issues:read"] }}
"""


class Stack:
    def __init__(self, app, url: str, tools: dict[str, McpTool], agent_token: str):
        self.app, self.url, self.tools, self.agent_token = app, url, tools, agent_token

    @property
    def signer(self):
        return self.app.extensions["jit"].signer


@pytest.fixture(scope="module")
def stack(tmp_path_factory, openbao, oidc_provider, broker_port, oidc_client_secret, vault_setup):
    """The broker over HTTP on a port of its own (its issuer stays the configured base URL) and
    the example tool twice, at TOOL_A and TOOL_B, both introspecting as the github-tool client."""
    workdir = tmp_path_factory.mktemp("agent-path")
    settings = broker_settings(
        workdir,
        openbao,
        oidc_provider,
        broker_port,
        oidc_client_secret,
        policy_text=POLICY,
        reaper={"enabled": False},
        oauth={
            "key_publish_delay": PUBLISH_DELAY,
            "clients": {"ci-agent": {"jwks": {"keys": [AGENT_KEY.jwk()]}}},
        },
    )
    app = create_app(settings)
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=RequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    tools: dict[str, McpTool] = {}
    try:
        for name, resource in (("A", TOOL_A), ("B", TOOL_B)):
            tools[name] = McpTool.start(
                app.extensions["jit"].signer.issuer,
                f"{url}/.well-known/jwks.json",
                tmp_path_factory.mktemp(f"tool-{name}"),
                resource=resource,
                introspect=f"{url}/oauth/introspect",
                provider=oidc_provider.issuer,
                client_secret=tool_secret(oidc_client_secret),
                audience=oidc_provider.api_resource,
                jwks_cooldown=JWKS_COOLDOWN,
            )
        # The agent's own identity: a client-credentials JWT from the real provider.
        agent = client_credentials_token(
            oidc_provider, "ci-agent", agent_secret(oidc_client_secret)
        )
        yield Stack(app, url, tools, agent)
    finally:
        for tool in tools.values():
            tool.stop()
        server.shutdown()
        app.extensions["jit"].stop()


@pytest.fixture
def task(stack, tokens):
    """A task alice starts for ci-agent through the API, over HTTP."""
    body = {
        "entitlement": "triage",
        "duration": "10m",
        "reason": "the agent triages the new issues",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read", "issues:write"], "mirror": ["issues:read"]},
    }
    response = requests.post(
        f"{stack.url}/api/v1/requests",
        json=body,
        headers={"Authorization": f"Bearer {tokens('alice')}"},
        timeout=15,
    )
    assert response.status_code == 201, response.text
    grant = response.json()
    assert grant["status"] == "active"
    return grant


def exchange(stack, task, resource=TOOL_A, scope="issues:read") -> dict:
    response = requests.post(
        f"{stack.url}/oauth/token",
        data={
            "grant_type": EXCHANGE,
            "subject_token": task["credential"]["subject_token"],
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "actor_token": stack.agent_token,
            "actor_token_type": ACCESS,
            "resource": resource,
            "scope": scope,
        },
        timeout=15,
    )
    assert response.status_code == 200, response.text
    return response.json()


def call(resource: str, token: str, tool: str = "list_issues", arguments: dict | None = None):
    """One tool call through the official SDK's streamable-HTTP client: the result's data."""

    async def run():
        headers = {"Authorization": f"Bearer {token}"}
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(resource, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    return await session.call_tool(tool, arguments or {})

    result = anyio.run(run)
    assert not result.is_error, result.content
    if result.structured_content is not None:
        found = result.structured_content
        return found.get("result", found)
    (text,) = [c.text for c in result.content if getattr(c, "type", "") == "text"]
    return json.loads(text)


def refused(resource: str, token: str, tool: str = "list_issues") -> requests.Response:
    """The same call as plain HTTP (a tools/call JSON-RPC request): the tool's exact answer."""
    return requests.post(
        resource,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}},
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
        },
        timeout=15,
    )


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_the_agent_calls_the_tool_with_a_token_from_the_exchange(stack, task):
    answer = exchange(stack, task, scope="issues:read issues:write")
    token = answer["access_token"]
    titles = [issue["title"] for issue in call(TOOL_A, token)]
    assert "The reaper should say why" in titles
    made = call(TOOL_A, token, "create_issue", {"title": "from the agent path test"})
    assert made["title"] == "from the agent path test"

    claims = claims_of(token)
    assert claims["aud"] == TOOL_A and claims["sub"] == "alice"
    assert claims["act"] == {"sub": "ci-agent"} and claims["client_id"] == "ci-agent"
    window_end = datetime.fromisoformat(task["window"]["end"]).timestamp()
    assert claims["exp"] <= window_end  # no token outlives the window
    header = jwt.get_unverified_header(token)
    assert header["kid"] == stack.signer.kid(stack.signer.signing_version())
    assert grants_of(stack.app).chain(task["id"])[-1]["type"] == "token_issued"


def test_right_after_release_the_tool_refuses_the_token(stack, task, tokens):
    token = exchange(stack, task)["access_token"]
    assert call(TOOL_A, token)  # works before
    released = requests.post(
        f"{stack.url}/api/v1/requests/{task['id']}/release",
        headers={"Authorization": f"Bearer {tokens('alice')}"},
        timeout=15,
    )
    assert released.status_code == 200, released.text
    # Its signature and exp are still good: only introspection knows, and says inactive.
    answer = refused(TOOL_A, token)
    assert answer.status_code == 401
    challenge = answer.headers["WWW-Authenticate"]
    assert (
        challenge.startswith('Bearer error="invalid_token"') and "resource_metadata=" in challenge
    )
    with pytest.raises(Exception):  # noqa: B017 (the SDK raises an exception group)
        call(TOOL_A, token)


def test_a_token_for_tool_a_is_refused_by_tool_b(stack, task):
    for_a = exchange(stack, task, resource=TOOL_A)["access_token"]
    answer = refused(TOOL_B, for_a)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    for_b = exchange(stack, task, resource=TOOL_B)["access_token"]
    assert claims_of(for_b)["aud"] == TOOL_B
    assert call(TOOL_B, for_b)  # B takes its own tokens
    assert refused(TOOL_A, for_b).status_code == 401


def test_a_missing_scope_gets_403_insufficient_scope(stack, task):
    token = exchange(stack, task, scope="issues:read")["access_token"]
    assert call(TOOL_A, token)  # list_issues: issues:read is enough
    answer = refused(TOOL_A, token, "create_issue")
    assert answer.status_code == 403
    assert answer.json()["error"] == "insufficient_scope"
    challenge = answer.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="issues:write"' in challenge


def test_private_key_jwt_and_the_persons_own_token_get_a_token_the_tool_takes(stack, task, tokens):
    """The agent authenticates with an assertion signed by its own key instead of its provider
    token, and names the task first by its subject token, then by alice's own access token."""
    token_url = stack.signer.issuer + "/oauth/token"
    for subject, subject_type in (
        (task["credential"]["subject_token"], SUBJECT_TOKEN_TYPE),
        (tokens("alice"), ACCESS),
    ):
        response = requests.post(
            f"{stack.url}/oauth/token",
            data={
                "grant_type": EXCHANGE,
                "subject_token": subject,
                "subject_token_type": subject_type,
                "client_assertion_type": JWT_BEARER,
                "client_assertion": AGENT_KEY.assertion("ci-agent", token_url),
                "resource": TOOL_A,
                "scope": "issues:read",
            },
            timeout=15,
        )
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        assert "The reaper should say why" in [issue["title"] for issue in call(TOOL_A, token)]
        claims = claims_of(token)
        assert claims["sub"] == "alice" and claims["act"] == {"sub": "ci-agent"}
        issued = grants_of(stack.app).store.access_token(jti_handle(claims["jti"]))
        assert issued is not None and issued["agent"] == "ci-agent"


def test_after_the_window_end_the_tool_refuses_the_token(stack, tokens):
    """A task of a few seconds: the token works inside the window and is refused once it has
    closed, with no release and no reaper (introspection, and the exp capped to the window end)."""
    body = {
        "entitlement": "triage",
        "duration": "8s",
        "reason": "a task that ends on its own",
        "agent": "ci-agent",
        "tools": {"github": ["issues:read"]},
    }
    started = requests.post(
        f"{stack.url}/api/v1/requests",
        json=body,
        headers={"Authorization": f"Bearer {tokens('alice')}"},
        timeout=15,
    )
    assert started.status_code == 201, started.text
    task = started.json()
    token = exchange(stack, task)["access_token"]
    window_end = datetime.fromisoformat(task["window"]["end"]).timestamp()
    assert claims_of(token)["exp"] == window_end  # capped to the window, not the 5m lifetime
    assert call(TOOL_A, token)  # inside the window

    while time.time() <= window_end + 1:
        time.sleep(0.2)
    answer = refused(TOOL_A, token)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


def test_after_a_key_rotation_old_tokens_verify_and_new_ones_carry_the_new_kid(
    stack, task, openbao
):
    """The running tools (their JWKS cached from before the rotation) take every token: the old
    version's until their exp, the new version's once it signs, PUBLISH_DELAY after the
    rotation, by which time a tool may refetch the JWKS that already publishes it."""
    old = exchange(stack, task)["access_token"]
    old_version = stack.signer.signing_version()
    assert jwt.get_unverified_header(old)["kid"] == stack.signer.kid(old_version)
    assert call(TOOL_A, old)  # the tool holds the JWKS of before the rotation

    openbao.client().secrets.transit.rotate_key(stack.signer.key_name)  # the operator's root
    new_version = stack.signer.versions(fresh=True).latest  # instead of waiting for keys_ttl
    new_kid = stack.signer.kid(new_version)
    published = requests.get(f"{stack.url}/.well-known/jwks.json", timeout=5).json()["keys"]
    assert [key["kid"] for key in published][0] == new_kid  # published at once, newest first
    soon = exchange(stack, task)["access_token"]
    assert jwt.get_unverified_header(soon)["kid"] == stack.signer.kid(old_version)

    assert wait_until(lambda: stack.signer.signing_version() == new_version, PUBLISH_DELAY + 5)
    new = exchange(stack, task)["access_token"]
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    # The same running tool learns the new kid (one refetch) and still takes the old tokens.
    assert call(TOOL_A, new)
    assert call(TOOL_A, old) and call(TOOL_A, soon)
    # A verifier reading the JWKS now takes both, and learns the new kid from it.
    verifier = ToolTokenVerifier(stack.signer.issuer, f"{stack.url}/.well-known/jwks.json", TOOL_A)
    assert verifier.verify(old).jti != verifier.verify(new).jti
    with pytest.raises(InvalidToken):
        ToolTokenVerifier(stack.signer.issuer, f"{stack.url}/.well-known/jwks.json", TOOL_B).verify(
            new
        )
