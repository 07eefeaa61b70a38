"""The agent path, end to end, against a running dev stack (scripts/dev): a person starts a task
for ci-agent, the agent gets its own token from the OIDC provider, exchanges it with the task's
subject token for a token for the example tool (RFC 8693 at the broker's /oauth/token), calls the
tool with the official `mcp` SDK, the person releases the task, and the tool refuses the token.
Each step prints one line; the first that fails prints why, in one line, and exits 1.

    .venv/bin/python scripts/example/demo_agent.py            # the defaults fit scripts/dev
    .venv/bin/python scripts/example/demo_agent.py --user bob --scope issues:read
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from broker.backends.tool_task import SUBJECT_TOKEN_TYPE  # noqa: E402
from scripts.launchers import (  # noqa: E402
    AGENT_CLIENT_ID,
    LoginFailed,
    OidcProvider,
    ServiceError,
    client_credentials_token,
    user_access_token,
)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (a name)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a name)
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "demo-agent", "version": "0"},
    },
}
T = TypeVar("T")


class StepFailed(Exception):
    """One step of the path did not work; the message says why in one line."""


@dataclass
class Task:
    grant_id: str
    subject_token: str
    window_end: str


def say(step: int, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def run_step(step: int, what: str, action: Callable[[], T]) -> T:
    """Run one step; any failure becomes one line naming the step, and the exit status 1."""
    try:
        return action()
    except StepFailed as exc:
        reason = str(exc)
    except requests.ConnectionError as exc:
        where = urlsplit(exc.request.url) if exc.request is not None and exc.request.url else None
        target = f" to {where.scheme}://{where.netloc}" if where else ""
        reason = f"cannot connect{target}; is scripts/dev running?"
    except requests.RequestException as exc:
        reason = _first_line(exc)
    except LoginFailed as exc:
        reason = f"{exc} {_first_line(exc.page_text)}".strip()
    except ServiceError as exc:
        reason = _first_line(exc)
    say(step, f"{what}: FAILED: {reason}")
    raise SystemExit(1)


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0][:300] if text else type(value).__name__


def _error_of(response: requests.Response) -> str:
    """An HTTP refusal in one line: the OAuth error (RFC 6749 5.2) or the broker's problem."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {_first_line(response.text) or 'no body'}"
    if isinstance(body, dict):
        code = body.get("error") or body.get("code") or body.get("title") or ""
        detail = body.get("error_description") or body.get("detail") or ""
        return f"HTTP {response.status_code} {code}: {detail}".rstrip(": ")
    return f"HTTP {response.status_code}"


# --- the steps -----------------------------------------------------------------------------------


def person_token(args: argparse.Namespace) -> str:
    provider = OidcProvider(None, {"issuer": args.provider})
    return user_access_token(provider, args.user)


def start_task(args: argparse.Namespace, person: str) -> Task:
    response = requests.post(
        f"{args.broker}/api/v1/requests",
        json={
            "entitlement": args.entitlement,
            "duration": args.duration,
            "reason": args.reason,
            "agent": args.agent,
            "tools": {args.tool: args.scope.split()},
        },
        headers={"Authorization": f"Bearer {person}"},
        timeout=15,
    )
    if response.status_code != 201:
        raise StepFailed(f"the broker refused the task: {_error_of(response)}")
    grant = response.json()
    credential = grant.get("credential") or {}
    if grant.get("status") != "active" or "subject_token" not in credential:
        raise StepFailed(f"the task is {grant.get('status')}, not active (does it need approval?)")
    return Task(grant["id"], credential["subject_token"], grant["window"]["end"])


def agent_token(args: argparse.Namespace) -> str:
    provider = OidcProvider(None, {"issuer": args.provider})
    return client_credentials_token(provider, args.agent, agent_secret_of(args))


def agent_secret_of(args: argparse.Namespace) -> str:
    if args.agent_secret:
        return args.agent_secret
    from scripts.devstack import NotRunning, client_secret_of

    try:
        return client_secret_of(args.agent)
    except KeyError:
        raise StepFailed(
            f"give --agent-secret: scripts/dev knows no secret of {args.agent}"
        ) from None
    except NotRunning as exc:
        raise StepFailed(str(exc)) from None


def exchange(args: argparse.Namespace, task: Task, actor: str) -> dict:
    endpoint = f"{args.broker}/oauth/token"
    response = requests.post(
        endpoint,
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": task.subject_token,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "actor_token": actor,
            "actor_token_type": ACCESS_TOKEN_TYPE,
            "resource": args.resource,
            "scope": args.scope,
        },
        headers={"Accept": "application/json"},
        timeout=15,
    )
    if response.status_code == 404:
        raise StepFailed(f"the broker has no token endpoint (404 at {endpoint}); not built yet?")
    if response.status_code != 200:
        raise StepFailed(f"the broker refused the exchange: {_error_of(response)}")
    try:
        answer = response.json()
        answer["access_token"]
    except (ValueError, KeyError, TypeError):
        raise StepFailed("the token endpoint answered without an access_token") from None
    return answer


def call_tool(args: argparse.Namespace, access_token: str) -> list:
    """list_issues through the official SDK's streamable-HTTP client."""
    import anyio
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async def run() -> list:
        headers = {"Authorization": f"Bearer {access_token}"}
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(args.resource, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as session:
                    await session.initialize()
                    result = await session.call_tool("list_issues", {})
        if result.is_error:
            raise StepFailed(f"the tool answered an error: {_first_line(result.content)}")
        if result.structured_content is not None:
            found = result.structured_content.get("result", result.structured_content)
            return found if isinstance(found, list) else [found]
        return [json.loads(c.text) for c in result.content if getattr(c, "type", "") == "text"]

    try:
        return anyio.run(run)
    except StepFailed:
        raise
    except BaseException as exc:  # the SDK's task groups raise groups; say the first cause
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise StepFailed(f"the MCP call failed: {_innermost(exc)}") from None


def _innermost(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {_first_line(exc)}"


def release(args: argparse.Namespace, person: str, task: Task) -> str:
    response = requests.post(
        f"{args.broker}/api/v1/requests/{task.grant_id}/release",
        headers={"Authorization": f"Bearer {person}"},
        timeout=15,
    )
    if response.status_code != 200:
        raise StepFailed(f"the broker refused the release: {_error_of(response)}")
    return str(response.json().get("status"))


def tool_refuses(args: argparse.Namespace, access_token: str) -> str:
    """The same token again, as plain HTTP: the exact status and challenge the tool answers."""
    response = requests.post(
        args.resource,
        json=INITIALIZE,
        headers={
            "Authorization": f"Bearer {access_token}",
            "Accept": "application/json, text/event-stream",
        },
        timeout=15,
    )
    if response.status_code == 200:
        raise StepFailed(
            "the tool still accepts the token (it checks only the signature and exp: start it "
            "with --introspect to refuse a released task's tokens at once)"
        )
    challenge = response.headers.get("WWW-Authenticate", "")
    return f"HTTP {response.status_code} {challenge}".strip()


# --- the whole path ------------------------------------------------------------------------------


def default_resource() -> str:
    from scripts.devstack import example_tool_resource

    return example_tool_resource()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="The defaults fit scripts/dev and scripts/example/policy.toml.",
    )
    parser.add_argument("--broker", default="http://localhost:5000", help="the broker's URL")
    parser.add_argument("--provider", default="http://127.0.0.1:9000", help="the OIDC issuer")
    parser.add_argument("--user", default="alice", help="the person who starts the task")
    parser.add_argument("--agent", default=AGENT_CLIENT_ID, help="the agent's client id")
    parser.add_argument(
        "--agent-secret", default="", help="its client secret (default: scripts/dev's)"
    )
    parser.add_argument("--entitlement", default="triage-task", help="a tool_task entitlement")
    parser.add_argument("--tool", default="github", help="the tool's name in the policy")
    parser.add_argument(
        "--resource", help="the tool's resource URI (default: the example policy's github tool)"
    )
    parser.add_argument("--scope", default="issues:read", help="space-separated scopes")
    parser.add_argument("--duration", default="10m")
    parser.add_argument("--reason", default="demo: the agent triages the new issues")
    parser.add_argument(
        "--keep", action="store_true", help="leave the task active (no release, no last check)"
    )
    args = parser.parse_args(argv)
    args.broker = args.broker.rstrip("/")
    args.provider = args.provider.rstrip("/")
    if not args.resource:
        args.resource = default_resource()
    return args


def agent_path(args: argparse.Namespace, task: Task) -> str:
    """Steps 3 to 5, the agent's: its own token, the exchange, the tool call. The tool's token."""
    actor = run_step(3, f"{args.agent} gets its token", lambda: agent_token(args))
    say(3, f"{args.agent} gets its own access token from the provider (client credentials)")
    answer = run_step(4, "the token exchange", lambda: exchange(args, task, actor))
    say(
        4,
        f"{args.agent} exchanges at {args.broker}/oauth/token: a {answer.get('token_type')} "
        f"token for {args.resource}, scope {answer.get('scope')!r}, "
        f"expires in {answer.get('expires_in')} s",
    )
    access = str(answer["access_token"])
    issues = run_step(5, "the tool call", lambda: call_tool(args, access))
    titles = "; ".join(str(i.get("title", i)) if isinstance(i, dict) else str(i) for i in issues)
    say(5, f"{args.agent} calls list_issues over MCP: {len(issues)} issue(s): {titles}")
    return access


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    person = run_step(1, f"{args.user} logs in", lambda: person_token(args))
    say(1, f"{args.user} logs in at {args.provider}: got an access token for the broker's API")
    task = run_step(2, "the task starts", lambda: start_task(args, person))
    say(
        2,
        f"{args.user} starts {args.entitlement} for {args.agent} ({args.tool}: {args.scope}): "
        f"grant {task.grant_id}, active until {task.window_end}, subject token handed over",
    )
    try:
        access = agent_path(args, task)
    except SystemExit:
        # Leave nothing behind: a step after the start failed, so the task ends here.
        try:
            status = release(args, person, task)
            say(6, f"{args.user} releases the task after the failure: the grant is {status}")
        except (StepFailed, requests.RequestException) as exc:
            say(6, f"the task could not be released ({_first_line(exc)}): release {task.grant_id}")
        raise
    if args.keep:
        say(6, f"the task stays active (--keep): release grant {task.grant_id} when done")
        return
    status = run_step(6, "the release", lambda: release(args, person, task))
    say(6, f"{args.user} releases the task: the grant is {status}")
    refused = run_step(7, "the tool refuses", lambda: tool_refuses(args, access))
    say(7, f"the same token at the tool now: {refused}")


if __name__ == "__main__":
    main()
