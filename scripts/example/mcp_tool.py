"""An example tool: an MCP server (the official `mcp` SDK, streamable HTTP) that accepts only the
broker's access tokens made for it. It shows what a tool does with broker/toolauth.py: RFC 9728
protected resource metadata naming the broker, 401 with `resource_metadata` without a valid
token, 403 `insufficient_scope` naming the scope a tool call lacks. The issues are toy data kept
in memory; nothing here is part of the broker.

    python scripts/example/mcp_tool.py --issuer http://localhost:5000 \\
        --jwks-uri http://localhost:5000/.well-known/jwks.json \\
        --resource http://127.0.0.1:8300/mcp --port 8300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import anyio.to_thread
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from broker.errors import BrokerError  # noqa: E402
from broker.toolauth import ClientCredentials, Introspection, ToolTokenVerifier  # noqa: E402

log = logging.getLogger("mcp_tool")

# What each tool needs; `scopes_supported` in the metadata is these scopes.
TOOL_SCOPES = {"list_issues": "issues:read", "create_issue": "issues:write"}
# The audience the broker's API accepts at the OIDC provider (the broker's [oidc] audience).
API_AUDIENCE = "urn:jit-broker:api"
# A JSON-RPC request larger than this is not an MCP tool call we serve.
MAX_BODY = 1024 * 1024


class BrokerTokens:
    """The SDK's TokenVerifier over broker/toolauth.py: a token it refuses is no token (the SDK
    answers 401 invalid_token with resource_metadata). Verification may fetch the JWKS or ask
    introspection, blocking calls, so it runs in a worker thread."""

    def __init__(self, verifier: ToolTokenVerifier):
        self.verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            checked = await anyio.to_thread.run_sync(self.verifier.verify, token)
        except BrokerError as exc:
            log.info("token refused: %s", exc.detail)
            return None
        return AccessToken(
            token=token,
            client_id=checked.client_id,
            scopes=sorted(checked.scopes),
            expires_at=checked.expires_at,
            resource=self.verifier.resource,
            subject=checked.subject,
            claims=checked.claims,
        )


class ScopeGate:
    """Answers 403 insufficient_scope (RFC 6750 §3.1, as the MCP authorization spec asks) to a
    `tools/call` whose tool needs a scope the token lacks, before the SDK runs it. The SDK checks
    scopes only for the whole endpoint, so this reads the JSON-RPC body and replays it. A request
    without a valid token passes on: the SDK answers it 401."""

    def __init__(self, app: ASGIApp, tokens: BrokerTokens, path: str, metadata_url: str):
        self.app, self.tokens, self.path, self.metadata_url = app, tokens, path, metadata_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                await _answer(send, 413, {"error": "invalid_request"}, {})
                return
        needed = _needed_scope(body)
        if needed is not None:
            token = await self._token(scope)
            if token is not None and needed not in token.scopes:
                challenge = (
                    f'Bearer error="insufficient_scope", scope="{needed}", '
                    f'resource_metadata="{self.metadata_url}"'
                )
                detail = f"this tool needs the scope {needed}"
                body_out = {"error": "insufficient_scope", "error_description": detail}
                await _answer(send, 403, body_out, {"www-authenticate": challenge})
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _token(self, scope: Scope) -> AccessToken | None:
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return await self.tokens.verify_token(value[7:].decode("latin-1"))
        return None


def _needed_scope(body: bytes) -> str | None:
    """The scope a JSON-RPC `tools/call` for one of our tools needs, or None."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    return TOOL_SCOPES.get(name) if isinstance(name, str) else None


async def _answer(send: Send, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _require(scope: str) -> None:
    """The gate's check again, where the tool runs: no path reaches the data without it."""
    token = get_access_token()
    if token is None or scope not in token.scopes:
        raise ToolError(f"insufficient_scope: this tool needs {scope}")


def build_app(verifier: ToolTokenVerifier, issuer: str) -> Starlette:
    """The ASGI app: the SDK's MCP endpoint at the resource's path behind the scope gate, and
    the RFC 9728 metadata naming the broker as the authorization server."""
    resource = verifier.resource
    path = urlsplit(resource).path or "/"
    tokens = BrokerTokens(verifier)
    server = MCPServer(
        name="example-issues",
        token_verifier=tokens,
        auth=AuthSettings(
            issuer_url=AnyHttpUrl(issuer),
            resource_server_url=AnyHttpUrl(resource),
            validate_token_resource=True,  # the verifier checks `aud` exactly; this too
        ),
    )
    issues: list[dict] = [{"id": 1, "title": "The reaper should say why", "state": "open"}]

    @server.tool()
    def list_issues() -> list[dict]:
        """All issues (needs issues:read)."""
        _require("issues:read")
        return list(issues)

    @server.tool()
    def create_issue(title: str) -> dict:
        """Open an issue (needs issues:write)."""
        _require("issues:write")
        issue = {"id": len(issues) + 1, "title": title, "state": "open"}
        issues.append(issue)
        return issue

    sdk_app = server.streamable_http_app(streamable_http_path=path)
    metadata_url = str(build_resource_metadata_url(AnyHttpUrl(resource)))
    # Ours first: the SDK's own metadata route lists no scopes and adds a slash to the issuer,
    # which a client compares exactly (RFC 8414 §3.3).
    document = {
        "resource": resource,
        "authorization_servers": [issuer],
        "scopes_supported": sorted(set(TOOL_SCOPES.values())),
        "bearer_methods_supported": ["header"],
        "resource_name": "example issues tool",
    }
    metadata = Route(urlsplit(metadata_url).path, lambda request: JSONResponse(document))
    gate = ScopeGate(sdk_app, tokens, path, metadata_url)
    return Starlette(
        routes=[metadata, Mount("/", app=gate)],
        lifespan=lambda app: server.session_manager.run(),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", required=True, help="the broker's issuer (its base URL)")
    parser.add_argument("--jwks-uri", required=True, help="the broker's JWKS")
    parser.add_argument("--resource", required=True, help="this tool's resource URI (RFC 8707)")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--introspect", help="the broker's introspection endpoint (optional)")
    parser.add_argument("--client-id", help="this tool's client id, for introspection")
    parser.add_argument(
        "--provider", help="the OIDC issuer this tool gets its own token from, for introspection"
    )
    parser.add_argument(
        "--audience",
        default=API_AUDIENCE,
        help=f"the broker's API audience at the provider (default {API_AUDIENCE})",
    )
    parser.add_argument(
        "--jwks-cooldown",
        type=float,
        default=30,
        help="seconds between fetches of the broker's JWKS on an unknown kid (default 30)",
    )
    args = parser.parse_args(argv)
    introspect = None
    if args.introspect:
        if not args.provider or not args.client_id:
            parser.error("--introspect needs --provider and --client-id")
        # The secret comes from the environment, never from the command line (ps shows it).
        secret = _env("JIT_TOOL_CLIENT_SECRET")
        own_token = ClientCredentials(args.provider, args.client_id, secret, args.audience)
        introspect = Introspection(args.introspect, bearer=own_token)
    verifier = ToolTokenVerifier(
        args.issuer,
        args.jwks_uri,
        args.resource,
        introspect=introspect,
        jwks_cooldown=args.jwks_cooldown,
    )
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(build_app(verifier, args.issuer), host=args.host, port=args.port, log_level="info")


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SystemExit(f"{name} must be set to use introspection")
    return value


if __name__ == "__main__":
    main()
