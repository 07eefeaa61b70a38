"""The example MCP tool (scripts/example/mcp_tool.py) as a real process, called with the `mcp`
SDK's streamable-HTTP client and with plain HTTP for the exact 401/403 answers. Tokens are signed
with an ES256 key the test serves from a real JWKS server, as the broker's transit key will be."""

import json
import time

import anyio
import pytest
import requests
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from scripts.launchers import McpTool
from tests.helpers import JwksServer, SigningKey

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    key = SigningKey("transit-1", "ES256")
    jwks = JwksServer([key])
    tool = McpTool.start(jwks.issuer, f"{jwks.issuer}/jwks", tmp_path_factory.mktemp("mcp"))
    yield jwks, key, tool
    tool.stop()
    jwks.stop()


def token(stack, scope="issues:read", key=None, **claims):
    jwks, broker_key, tool = stack
    body = {
        "aud": tool.resource,
        "sub": "alice",
        "client_id": "ci-agent",
        "act": {"sub": "ci-agent"},
        "scope": scope,
        "jti": f"j-{time.monotonic_ns()}",
        **claims,
    }
    return (key or broker_key).token(jwks.issuer, **body)


def call(tool, bearer, name, arguments=None):
    """Initialize a session with the SDK's client and call one tool."""

    async def run():
        headers = {"Authorization": f"Bearer {bearer}"}
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(tool.resource, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    return await session.call_tool(name, arguments or {})

    return anyio.run(run)


def post(tool, bearer=None, body=None):
    headers = {"Accept": "application/json, text/event-stream"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return requests.post(tool.resource, json=body or INITIALIZE, headers=headers, timeout=10)


def test_a_valid_token_with_the_scope_gets_an_answer(stack):
    tool = stack[2]
    listed = call(tool, token(stack, "issues:read"), "list_issues")
    assert not listed.is_error
    assert "The reaper should say why" in json.dumps(listed.model_dump(mode="json"))
    created = call(tool, token(stack, "issues:write"), "create_issue", {"title": "agents"})
    assert not created.is_error
    assert "agents" in json.dumps(created.model_dump(mode="json"))


def test_the_metadata_names_the_broker_and_the_scopes(stack):
    jwks, _, tool = stack
    document = requests.get(tool.metadata_url, timeout=5).json()
    assert document["resource"] == tool.resource
    assert document["authorization_servers"] == [jwks.issuer]  # exactly, no added slash
    assert document["scopes_supported"] == ["issues:read", "issues:write"]
    assert document["bearer_methods_supported"] == ["header"]


def test_no_token_gets_401_pointing_at_the_metadata(stack):
    tool = stack[2]
    response = post(tool)
    assert response.status_code == 401
    assert f'resource_metadata="{tool.metadata_url}"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    "bad",
    [
        {"aud": "https://tools.internal/another-tool"},
        {"exp": int(time.time()) - 120},
        {"key": SigningKey("transit-1", "ES256")},  # the broker's kid, another key
        {"key": SigningKey("transit-unknown", "ES256")},
    ],
    ids=["another-tool", "expired", "wrong-signature", "unknown-kid"],
)
def test_a_bad_token_gets_401_invalid_token(stack, bad):
    tool = stack[2]
    response = post(tool, token(stack, "issues:read issues:write", **bad))
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert f'resource_metadata="{tool.metadata_url}"' in challenge


def test_a_missing_scope_gets_403_insufficient_scope(stack):
    tool = stack[2]
    bearer = token(stack, "issues:read")
    assert post(tool, bearer).status_code == 200  # the token itself is fine
    body = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "create_issue", "arguments": {"title": "x"}},
    }
    response = post(tool, bearer, body)
    assert response.status_code == 403
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="issues:write"' in challenge
    assert response.json()["error"] == "insufficient_scope"


def test_the_sdk_client_is_refused_a_tool_beyond_its_scope(stack):
    tool = stack[2]
    with pytest.raises(ExceptionGroup) as refused:  # the SDK's task group carries the error
        call(tool, token(stack, "issues:read"), "create_issue", {"title": "x"})
    assert refused.group_contains(MCPError)
    listed = call(tool, token(stack, "issues:read"), "list_issues")
    assert "x" not in [issue.get("title") for issue in _issues(listed)]


def _issues(result):
    structured = result.structured_content or {}
    return structured.get("result", [])


def test_garbage_gets_4xx_never_500(stack):
    tool = stack[2]
    for bearer in ["", "x" * 20000, "a.b.c", "é"]:
        headers = {"Authorization": f"Bearer {bearer}".encode()}
        response = requests.post(tool.resource, data=b"{", headers=headers, timeout=10)
        assert 400 <= response.status_code < 500
