"""The task part of the browser pages: which agents and tool scopes the eligible task
entitlements offer on the request form, what a posted form asks for (`agent`, `tools`, for
grants.request to judge exactly as it judges the API's body), and how an agent uses a subject
token (the token exchange, shown with the credential). Reads forms and the policy; decides
nothing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from werkzeug.datastructures import MultiDict

from ..backends.tool_task import SUBJECT_TOKEN_TYPE
from ..models import Grant
from ..policy import Entitlement, Tool

# One checkbox per scope: name "tool:<tool>", value "<scope>"; whatever is posted is passed on as
# asked, for grants.request to check and the policy to refuse.
TOOL_FIELD = "tool:"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (a name)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a name)


@dataclass(frozen=True)
class Offer:
    """An agent, or a tool's scope, with the task entitlements that offer it."""

    value: str
    entitlements: tuple[str, ...]
    tool: str = ""  # set for a scope


def offers(entitlements: Iterable[Entitlement]) -> tuple[list[Offer], list[Offer]]:
    """The agents and the (tool, scope) pairs the eligible task entitlements allow, in policy
    order, each naming the entitlements that allow it: the form's select and checkboxes."""
    agents: dict[str, list[str]] = {}
    scopes: dict[tuple[str, str], list[str]] = {}
    for entitlement in entitlements:
        rule = entitlement.task
        if rule is None:
            continue
        for agent in rule.agents:
            agents.setdefault(agent, []).append(entitlement.name)
        for tool, allowed in rule.tools:
            for scope in allowed:
                scopes.setdefault((tool, scope), []).append(entitlement.name)
    return (
        [Offer(agent, tuple(names)) for agent, names in agents.items()],
        [Offer(scope, tuple(names), tool) for (tool, scope), names in scopes.items()],
    )


def asked(form: MultiDict, chosen: Entitlement | None) -> tuple[object, object]:
    """The `agent` and `tools` a posted form names, as the API's body would: (None, None) unless
    the chosen entitlement is a task (the task fields sit on the one form for every entitlement);
    an empty choice stays None, so the policy says what is missing."""
    if chosen is None or chosen.task is None:
        return None, None
    agent = (form.get("agent") or "").strip() or None
    tools: dict[str, list[str]] = {}
    for key in form:
        if key.startswith(TOOL_FIELD):
            scopes = [scope for scope in form.getlist(key) if scope]
            if scopes:
                tools[key[len(TOOL_FIELD) :]] = scopes
    return agent, tools or None


def checked(form: Mapping) -> set[tuple[str, str]]:
    """The (tool, scope) boxes a refused form had ticked, to show them ticked again."""
    if not isinstance(form, MultiDict):
        return set()
    return {
        (key[len(TOOL_FIELD) :], scope)
        for key in form
        if key.startswith(TOOL_FIELD)
        for scope in form.getlist(key)
    }


@dataclass(frozen=True)
class Exchange:
    """What the credential page shows an agent for one tool of its task: the token exchange."""

    tool: str
    resource: str
    scope: str


def exchanges(grant: Grant, tools: Mapping[str, Tool]) -> list[Exchange]:
    """Per tool of the task (and declared in the policy still), the exchange an agent makes."""
    task = grant.task
    if task is None:
        return []
    return [
        Exchange(name, tools[name].resource, " ".join(scopes))
        for name, scopes in task.tools
        if name in tools
    ]


def exchange_fields(exchange: Exchange) -> list[tuple[str, str]]:
    """The form fields of the RFC 8693 request, with shell variables for the two tokens."""
    return [
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", "$SUBJECT_TOKEN"),
        ("subject_token_type", SUBJECT_TOKEN_TYPE),
        ("actor_token", "$AGENT_TOKEN"),
        ("actor_token_type", ACCESS_TOKEN_TYPE),
        ("resource", exchange.resource),
        ("scope", exchange.scope),
    ]
