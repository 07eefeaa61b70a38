"""Task grants for agents, as the token endpoint needs them: the shape of a task asked for, and
the active task a subject token names (the broker's own, or the person's access token). Reads
only; the task's life (request, approval, start, release, reap) is the same use cases as any
grant's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..backends.tool_task import ToolTaskKind, subject_token_handle
from ..errors import InvalidRequest, TaskNotActive, TokenRefused, UnknownTask
from ..models import ACTIVE, Grant, Principal, Task, parse_time
from ..policy import Tool
from .base import GrantsBase

TASK_BACKEND = ToolTaskKind.name
MAX_TOOLS = 32
MAX_NAME = 200


@dataclass(frozen=True)
class TaskScope:
    """What an active task lets its agent get tokens for: the agent (client id), each tool (its
    policy declaration: resource, scopes, token lifetime) with the scopes granted, the person it
    is on behalf of (None when the agent started it itself), and the window end no token may
    outlive."""

    agent: str
    tools: dict[str, tuple[Tool, tuple[str, ...]]]
    on_behalf_of: dict | None  # {"iss", "sub", "display"} of the person, or None
    window_end: datetime

    def tool_for(self, resource: str) -> tuple[Tool, tuple[str, ...]] | None:
        """The tool of the task whose resource URI is `resource` (RFC 8707), with its scopes."""
        for tool, scopes in self.tools.values():
            if tool.resource == resource:
                return tool, scopes
        return None


class Tasks(GrantsBase):
    def task_for_subject_token(self, subject_token: object) -> tuple[Grant, TaskScope]:
        """The active task grant a subject token names, and what it allows, for the token
        endpoint. Raises UnknownTask when no grant holds this token (never issued, or replaced by
        an extension), TaskNotActive when its grant is not active now (pending, approved, closed,
        or past its window end even before the reaper got to it)."""
        if not isinstance(subject_token, str) or not subject_token or len(subject_token) > 512:
            raise UnknownTask("no task holds this subject token")
        grant = self.store.grant_holding(TASK_BACKEND, subject_token_handle(subject_token))
        if grant is None or grant.task is None:
            raise UnknownTask("no task holds this subject token")
        if grant.status != ACTIVE:
            raise TaskNotActive(f"task {grant.id} is {grant.status}", grant.status)
        end = parse_time(grant.window_end)
        if end <= self.clock():
            raise TaskNotActive(f"task {grant.id}'s window ended at {grant.window_end}", "expired")
        return grant, self._task_scope(grant, end)

    def task_for_person(
        self, person: Principal, agent: str, resource: object, scope: object
    ) -> tuple[Grant, TaskScope]:
        """RFC 8693 delegation, the subject token being the person's own access token (verified
        by the caller): the person's active task for `agent`, started by them on their own
        behalf, that holds the tool `resource` with every scope of `scope` (any of its scopes
        when None). When several do, the one whose window ends last (then the one requested
        last, then the greatest id): the token may live longest, and the choice is the same on
        every replica. Raises TokenRefused (invalid_grant) for an agent's token, UnknownTask
        when no task matches."""
        if person.kind != "human" or person.subject == agent:
            raise TokenRefused(
                "invalid_grant", "the subject token must be a person's access token, not an agent's"
            )
        wanted = set(scope.split()) if isinstance(scope, str) else set()
        now = self.clock()
        found: list[tuple[tuple[datetime, str, str], Grant, TaskScope]] = []
        for grant in self.store.active_tasks_for(person.issuer, person.subject, agent):
            end = parse_time(grant.window_end)
            if grant.task is None or end <= now:
                continue
            task = self._task_scope(grant, end)
            held = task.tool_for(resource) if isinstance(resource, str) else None
            if held is not None and wanted <= set(held[1]):
                found.append(((end, grant.created_at, grant.id), grant, task))
        if not found:
            raise UnknownTask(
                f"{person.display} has no active task for {agent} that holds this resource "
                "with these scopes"
            )
        _, grant, task = max(found, key=lambda match: match[0])
        return grant, task

    def _task_scope(self, grant: Grant, end: datetime) -> TaskScope:
        """What the task grant lets its agent get tokens for. The tools are read from the policy
        of now: a tool removed from the policy is no longer in the scope."""
        task = grant.task
        assert task is not None  # noqa: S101 - callers pass task grants only
        declared = self.policy().tools
        tools = {name: (declared[name], scopes) for name, scopes in task.tools if name in declared}
        person = (
            {"iss": grant.requester_iss, "sub": grant.requester_sub, "display": grant.requester}
            if grant.task_started_by == "person"
            else None
        )
        return TaskScope(task.agent, tools, person, end)


def task_asked(agent: object, tools: object) -> Task | None:
    """The task a request body names (`agent` and `tools: {name: [scopes]}`), shape checks only;
    None when it names neither. What the policy allows is broker/policy's to say."""
    if agent is None and tools is None:
        return None
    if not isinstance(agent, str) or not agent.strip() or len(agent) > MAX_NAME:
        raise InvalidRequest("agent must be the agent's client id (text) when tools are given")
    if not isinstance(tools, dict) or not tools:
        raise InvalidRequest('tools must be an object of tool names and scopes: {"tool": ["s"]}')
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"a task names at most {MAX_TOOLS} tools")
    for name, scopes in tools.items():
        if (
            not name
            or len(name) > MAX_NAME
            or not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) and s and len(s) <= MAX_NAME for s in scopes)
        ):
            raise InvalidRequest(f"tools.{name[:MAX_NAME]} must be a list of scopes (text)")
    return Task.of(agent.strip(), tools)
