"""Reading a policy file: parse the TOML, check every key and value, and report every problem with
the line it is on and a plain sentence. Builds the Policy that decide.py evaluates; evaluates
nothing itself."""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from ..durations import format_duration, parse_duration
from ..errors import ConfigError
from .decide import Policy
from .kinds import KindReader
from .model import (
    DAYS,
    ApprovalRule,
    BreakGlassRule,
    Entitlement,
    ExtendRule,
    ReasonRule,
    Requesters,
    Schedule,
    TaskRule,
    Tool,
)

# The kinds (each entitlement's `backend`) are not the policy's: broker/backends passes them in.
DEFAULT_BACKEND = "vault_token"
NEVER_GRANTED = {"root"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# The kind whose grants are tasks for agents: the policy reads its [task] table itself, since
# what a task may hold (tools, scopes, agents) is a rule, not a credential's option.
TASK_BACKEND = "tool_task"
SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 3.3 scope-token
DEFAULT_TOKEN_LIFETIME = 300
MAX_TOKEN_LIFETIME = 3600  # a tool's token is short-lived: the agent exchanges again
LOOPBACK_HOSTS = ("localhost",)

# --- problems -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file, at a line when it can be found."""

    line: int | None
    message: str

    def located(self, source: str) -> str:
        return f"{source}:{self.line}: {self.message}" if self.line else f"{source}: {self.message}"


class PolicyError(ConfigError):
    """A policy file that cannot be used; str() is one `FILE:LINE: message` per problem."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problem.located(source) for problem in problems))


TOP_KEYS = ("entitlements", "approver_groups", "tools")
TOOL_KEYS = ("resource", "scopes", "max_token_lifetime", "introspection_client")
ENTITLEMENT_KEYS = (
    "description",
    "backend",
    "vault_policies",
    "max_duration",
    "default_duration",
    "max_active",
    "requesters",
    "reason",
    "schedule",
    "approval",
    "extend",
    "break_glass",
    "task",
)  # and each kind's options table
SECTION_KEYS = {
    "approver_groups": ("known",),
    "requesters": ("groups", "email_domains", "claims", "agents"),
    "reason": ("min_length", "ticket"),
    "schedule": ("timezone", "days", "hours"),
    "approval": ("required", "from_groups", "each_of", "expires_after", "auto_approve_groups"),
    "extend": ("max_step", "max_total"),
    "break_glass": ("groups", "reviewers", "max_duration", "review_within"),
    "task": ("agents", "tools", "agent_may_start"),
}


# --- loading and checking -------------------------------------------------------------------------


def load_policy(path: Path, kinds: Iterable[KindReader]) -> Policy:
    """Read and check a policy file whose entitlements are of `kinds` (the broker passes
    broker.backends.POLICY_KINDS); raise PolicyError naming every problem, with its line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(str(path), [Problem(None, f"cannot read: {exc.strerror}")]) from None
    policy, problems = _check(raw, kinds)
    if policy is None:
        raise PolicyError(str(path), problems)
    return policy


def check_policy_text(
    text: str, kinds: Iterable[KindReader]
) -> tuple[Policy | None, list[Problem]]:
    """What load_policy does, on text: the policy (None when it has problems) and every problem."""
    return _check(text.encode(), kinds)


def _check(raw: bytes, kinds: Iterable[KindReader]) -> tuple[Policy | None, list[Problem]]:
    try:
        text = raw.decode()
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        return None, [Problem(None, "not valid TOML: the file is not UTF-8 text")]
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        return None, [Problem(int(found[1]) if found else None, f"not valid TOML: {exc}")]
    reader = _Reader(text, kinds)
    entitlements = reader.policy(data)
    problems = sorted(reader.problems, key=lambda p: (p.line is None, p.line or 0))
    if problems:
        return None, problems
    return Policy(entitlements, hashlib.sha256(raw).hexdigest(), reader.tools), []


class _Reader:
    """Turns parsed TOML into entitlements, noting every problem with the line it is on."""

    def __init__(self, text: str, kinds: Iterable[KindReader]):
        self.lines = _Lines(text)
        self.problems: list[Problem] = []
        self.tools: dict[str, Tool] = {}
        self.kinds = {kind.name: kind for kind in kinds}
        self.entitlement_keys = ENTITLEMENT_KEYS + tuple(
            kind.options_table for kind in self.kinds.values() if kind.options_table
        )

    @property
    def problem_count(self) -> int:
        return len(self.problems)

    def problem(self, path: tuple[str, ...], message: str) -> None:
        self.problems.append(Problem(self.lines.find(path), message))

    def policy(self, data: dict) -> dict[str, Entitlement]:
        self.unknown_keys(data, TOP_KEYS, (), "the top level")
        known = None
        if "approver_groups" in data:
            table = self.table(data["approver_groups"], ("approver_groups",), "[approver_groups]")
            self.unknown_keys(
                table, SECTION_KEYS["approver_groups"], ("approver_groups",), "approver_groups"
            )
            known = set(
                self.names(
                    table.get("known"), ("approver_groups", "known"), "approver_groups.known"
                )
            )
        self.tools = self.read_tools(data.get("tools"))
        specs = self.table(data.get("entitlements"), ("entitlements",), "[entitlements]")
        if not specs:
            self.problem(
                ("entitlements",),
                "the policy defines no entitlements: add [entitlements.NAME] tables",
            )
        entitlements = {}
        for name, spec in specs.items():
            entitlement = self.entitlement(name, spec, known)
            if entitlement is not None:
                entitlements[name] = entitlement
        return entitlements

    def entitlement(self, name: str, spec: object, known: set[str] | None) -> Entitlement | None:
        at = ("entitlements", name)
        if not NAME.fullmatch(name):
            self.problem(at, f"entitlement name {name!r} may hold only letters, digits, . _ -")
        if not isinstance(spec, dict):
            self.problem(at, f"{name} must be a table: [entitlements.{name}]")
            return None
        self.unknown_keys(spec, self.entitlement_keys, at, name)
        description = spec.get("description", "")
        if not isinstance(description, str):
            self.problem((*at, "description"), f"{name}: description must be text")
            description = ""
        backend = spec.get("backend", DEFAULT_BACKEND)
        kind = self.kinds.get(backend) if isinstance(backend, str) else None
        if kind is None:
            self.problem(
                (*at, "backend"),
                f"{name}: unknown backend {backend!r} (known: {', '.join(sorted(self.kinds))})",
            )
        policies = self.names(
            spec.get("vault_policies"), (*at, "vault_policies"), f"{name}: vault_policies"
        )
        # Vault lower-cases policy names, so "Root" would be root.
        for never in sorted(NEVER_GRANTED & {p.strip().lower() for p in policies}):
            self.problem((*at, "vault_policies"), f"{name}: the {never} policy is never granted")
        if kind is not None and kind.grants_instead is not None:
            if "vault_policies" in spec:
                self.problem(
                    (*at, "vault_policies"),
                    f"{name}: vault_policies has no effect on {kind.grants_instead}",
                )
        elif spec.get("vault_policies") in (None, []):
            self.problem(
                (*at, "vault_policies"), f"{name}: vault_policies must name at least one policy"
            )
        max_duration = self.duration(spec, "max_duration", at, name, required=True)
        default = self.duration(spec, "default_duration", at, name)
        if max_duration and default and default > max_duration:
            self.problem(
                (*at, "default_duration"),
                f"{name}: default_duration {format_duration(default)} is longer than "
                f"max_duration {format_duration(max_duration)}",
            )
        max_active = spec.get("max_active")
        if max_active is not None and not _whole(max_active, 1):
            self.problem(
                (*at, "max_active"), f"{name}: max_active must be a whole number of at least 1"
            )
            max_active = None
        approval = self.approval(name, spec, known)
        task = self.task(name, spec, backend)
        return Entitlement(
            name=name,
            description=description,
            backend=backend,
            vault_policies=policies,
            max_duration=max_duration or 0,
            default_duration=default,
            max_active=max_active,
            requesters=self.requesters(name, spec, task),
            reason=self.reason(name, spec),
            schedule=self.schedule(name, spec),
            approval=approval,
            extend=self.extend(name, spec, max_duration),
            break_glass=self.break_glass(name, spec, max_duration),
            task=task,
            options=self.options(name, spec, backend),
        )

    def options(self, name: str, spec: dict, backend: object) -> object | None:
        """Every kind checks what is its in the entitlement (its options table, present or
        misplaced); the options of the entitlement's own kind are kept."""
        options = None
        for kind in self.kinds.values():
            found = kind.read_options(self, name, spec, backend)
            if kind.name == backend:
                options = found
        return options

    def section(
        self, name: str, spec: dict, key: str, keys: tuple[str, ...] | None = None
    ) -> tuple[dict | None, tuple[str, ...]]:
        at = ("entitlements", name, key)
        if key not in spec:
            return None, at
        if not isinstance(spec[key], dict):
            self.problem(at, f"{name}: {key} must be a table: [entitlements.{name}.{key}]")
            return None, at
        known = SECTION_KEYS[key] if keys is None else keys
        self.unknown_keys(spec[key], known, at, f"{name}: {key}")
        return spec[key], at

    def read_tools(self, value: object) -> dict[str, Tool]:
        """The `[tools.NAME]` tables: each tool's resource URI, scopes and token lifetime."""
        if value is None:
            return {}
        tools: dict[str, Tool] = {}
        for name, spec in self.table(value, ("tools",), "[tools]").items():
            at = ("tools", name)
            if not NAME.fullmatch(name):
                self.problem(at, f"tool name {name!r} may hold only letters, digits, . _ -")
            if not isinstance(spec, dict):
                self.problem(at, f"tool {name} must be a table: [tools.{name}]")
                continue
            self.unknown_keys(spec, TOOL_KEYS, at, f"tool {name}")
            resource = self.resource(name, spec.get("resource"), (*at, "resource"))
            scopes = self.names(spec.get("scopes"), (*at, "scopes"), f"tool {name}: scopes")
            for scope in scopes:
                if not SCOPE.fullmatch(scope):
                    self.problem(
                        (*at, "scopes"),
                        f"tool {name}: scope {scope!r} may not hold spaces, quotes or backslashes",
                    )
            if "scopes" not in spec:
                self.problem(at, f'tool {name}: scopes is missing, like ["issues:read"]')
            elif spec["scopes"] == []:
                self.problem((*at, "scopes"), f"tool {name}: scopes must name at least one")
            lifetime = self.duration(spec, "max_token_lifetime", at, f"tool {name}")
            if lifetime is not None and lifetime > MAX_TOKEN_LIFETIME:
                self.problem(
                    (*at, "max_token_lifetime"),
                    f"tool {name}: max_token_lifetime {format_duration(lifetime)} is longer than "
                    f"{format_duration(MAX_TOKEN_LIFETIME)}: a tool token is short-lived",
                )
            if resource and resource in {tool.resource for tool in tools.values()}:
                self.problem(
                    (*at, "resource"), f"tool {name}: another tool already has resource {resource}"
                )
            # Kept even when its resource is wrong (the policy fails anyway), so an entitlement
            # naming it hears about its scopes, not that it does not exist.
            if isinstance(spec, dict):
                tools[name] = Tool(
                    name,
                    resource,
                    tuple(scopes),
                    lifetime or DEFAULT_TOKEN_LIFETIME,
                    self.introspection_client(name, spec.get("introspection_client"), at),
                )
        return tools

    def introspection_client(self, name: str, value: object, at: tuple[str, ...]) -> str:
        """The provider client that may introspect the tool's tokens ("" when none)."""
        if value is None:
            return ""
        if not isinstance(value, str) or not value.strip() or len(value) > 200:
            self.problem(
                (*at, "introspection_client"),
                f"tool {name}: introspection_client must be a client id of the OIDC provider",
            )
            return ""
        return value.strip()

    def resource(self, name: str, value: object, at: tuple[str, ...]) -> str:
        """An absolute https URI without a fragment (RFC 8707 2), or http on loopback for dev."""
        if value is None:
            self.problem(at[:-1], f"tool {name}: resource is missing, like https://tools.example/x")
            return ""
        parts = urlsplit(value) if isinstance(value, str) else None
        host = (parts.hostname or "") if parts else ""
        if (
            parts is None
            or not host
            or parts.fragment
            or "#" in str(value)
            or parts.username is not None
            or (parts.scheme != "https" and not (parts.scheme == "http" and _loopback(host)))
        ):
            self.problem(
                at,
                f"tool {name}: resource {value!r} must be an absolute https:// URI without a "
                "fragment (http:// only on loopback, for development)",
            )
            return ""
        return str(value)

    def task(self, name: str, spec: dict, backend: object) -> TaskRule | None:
        """The `[entitlements.NAME.task]` table of a tool_task entitlement: its agents, tools
        and scopes (each declared under [tools]), and whether an agent may start its own task."""
        if backend != TASK_BACKEND:
            if "task" in spec:
                self.problem(
                    ("entitlements", name, "task"),
                    f'{name}: a [task] table needs backend = "{TASK_BACKEND}", not {backend!r}',
                )
            return None
        if "task" not in spec:
            self.problem(
                ("entitlements", name),
                f"{name}: a {TASK_BACKEND} entitlement needs [entitlements.{name}.task] with "
                "agents and tools",
            )
            return None
        if "break_glass" in spec:
            self.problem(
                ("entitlements", name, "break_glass"),
                f"{name}: a task has no break-glass path: its agent and tools are asked for",
            )
        table, at = self.section(name, spec, "task")
        if table is None:
            return None
        agents = self.names(table.get("agents"), (*at, "agents"), f"{name}: task.agents")
        if not agents and "agents" not in table:
            self.problem(
                at, f'{name}: task.agents is missing: the agents\' client ids, like ["ci"]'
            )
        may_start = table.get("agent_may_start", False)
        if not isinstance(may_start, bool):
            self.problem(
                (*at, "agent_may_start"), f"{name}: task.agent_may_start must be true or false"
            )
            may_start = False
        tools = self.task_tools(name, table.get("tools"), (*at, "tools"))
        if not agents or not tools:
            return None
        return TaskRule(agents, tools, may_start)

    def task_tools(
        self, name: str, value: object, at: tuple[str, ...]
    ) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if not isinstance(value, dict) or not value:
            self.problem(
                at,
                f'{name}: task.tools must name tools and their scopes, like {{ github = ["x"] }}',
            )
            return ()
        found = []
        for tool, scopes in value.items():
            declared = self.tools.get(tool)
            listed = self.names(scopes, (*at, tool), f"{name}: task.tools.{tool}")
            if declared is None:
                known = ", ".join(sorted(self.tools)) or "none: declare it under [tools.NAME]"
                self.problem((*at, tool), f"{name}: unknown tool {tool!r} (known: {known})")
                continue
            if not listed:
                if scopes == []:
                    self.problem((*at, tool), f"{name}: task.tools.{tool} names no scope")
                continue
            undeclared = [s for s in listed if s not in declared.scopes]
            if undeclared:
                self.problem(
                    (*at, tool),
                    f"{name}: tool {tool} does not declare scope {', '.join(undeclared)} "
                    f"(it has: {', '.join(declared.scopes)})",
                )
                continue
            found.append((tool, tuple(sorted(set(listed)))))
        if len(found) != len(value):
            return ()
        return tuple(sorted(found))

    def requesters(self, name: str, spec: dict, task: TaskRule | None = None) -> Requesters:
        table, at = self.section(name, spec, "requesters")
        table = table or {}
        groups = self.names(table.get("groups"), (*at, "groups"), f"{name}: requesters.groups")
        domains = self.names(
            table.get("email_domains"), (*at, "email_domains"), f"{name}: requesters.email_domains"
        )
        for domain in domains:
            if "@" in domain or domain != domain.lower() or "." not in domain:
                self.problem(
                    (*at, "email_domains"),
                    f"{name}: email domain {domain!r} must be a lower-case domain like example.com",
                )
        agents = self.names(table.get("agents"), (*at, "agents"), f"{name}: requesters.agents")
        claims = self.claims(name, table.get("claims"), (*at, "claims"))
        if agents and spec.get("backend") == TASK_BACKEND:
            self.problem(
                (*at, "agents"),
                f"{name}: a task's agents are listed in task.agents (with agent_may_start for an "
                "agent that starts its own task), not requesters.agents",
            )
        if task is not None and task.agent_may_start and "requesters" not in spec:
            return Requesters()
        if not (groups or domains or agents or claims):
            self.problem(
                at if "requesters" in spec else ("entitlements", name),
                f"{name} has no requesters: give groups, email_domains, claims or agents "
                f"in [entitlements.{name}.requesters]",
            )
        return Requesters(groups, domains, claims, agents)

    def claims(self, name: str, value: object, at: tuple[str, ...]) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.problem(at, f'{name}: requesters.claims must be a table like {{ email = "x" }}')
            return ()
        claims = []
        for claim, accepted in value.items():
            values = [accepted] if isinstance(accepted, str) else accepted
            if (
                not isinstance(values, list)
                or not values
                or not all(isinstance(v, str) and v for v in values)
            ):
                self.problem(at, f"{name}: claim {claim} must be text or a list of text")
                continue
            claims.append((claim, tuple(values)))
        return tuple(claims)

    def reason(self, name: str, spec: dict) -> ReasonRule:
        table, at = self.section(name, spec, "reason")
        if table is None:
            return ReasonRule()
        min_length = table.get("min_length", 0)
        if not _whole(min_length, 0):
            self.problem((*at, "min_length"), f"{name}: reason.min_length must be a whole number")
            min_length = 0
        pattern = table.get("ticket")
        compiled = None
        if pattern is not None:
            if not isinstance(pattern, str) or not pattern:
                self.problem((*at, "ticket"), f"{name}: reason.ticket must be a pattern (text)")
            else:
                try:
                    compiled = re.compile(pattern)
                except re.error as exc:
                    self.problem(
                        (*at, "ticket"),
                        f"{name}: ticket pattern {pattern!r} does not compile: {exc}",
                    )
        return ReasonRule(min_length, compiled)

    def schedule(self, name: str, spec: dict) -> Schedule | None:
        table, at = self.section(name, spec, "schedule")
        if table is None:
            return None
        timezone = table.get("timezone", "UTC")
        try:
            if not isinstance(timezone, str) or not timezone:
                raise ValueError
            ZoneInfo(timezone)
        except Exception:  # ZoneInfo raises several types for a bad name
            self.problem(
                (*at, "timezone"),
                f"{name}: unknown timezone {timezone!r}: use a name like Europe/Berlin or UTC",
            )
            timezone = None
        days = table.get("days", list(DAYS))
        numbers, days_ok = [], isinstance(days, list) and bool(days)
        if not days_ok:
            self.problem((*at, "days"), f'{name}: schedule.days must be a list like ["mon"]')
        else:
            for day in days:
                if isinstance(day, str) and day in DAYS:
                    numbers.append(DAYS.index(day))
                else:
                    days_ok = False
                    self.problem(
                        (*at, "days"), f"{name}: unknown day {day!r}: use {', '.join(DAYS)}"
                    )
        hours = table.get("hours", "00:00-24:00")
        span = _hours(hours)
        if span is None:
            self.problem(
                (*at, "hours"),
                f"{name}: hours {hours!r} must be HH:MM-HH:MM like 08:00-18:00 or 22:00-06:00, "
                "not empty",
            )
        if timezone is None or span is None or not days_ok:
            return None
        return Schedule(timezone, tuple(sorted(set(numbers))), *span)

    def approval(self, name: str, spec: dict, known: set[str] | None) -> ApprovalRule | None:
        table, at = self.section(name, spec, "approval")
        if table is None:
            return None
        required = table.get("required", 1)
        if not _whole(required, 1):
            self.problem((*at, "required"), f"{name}: approval.required must be at least 1")
            required = 1
        from_groups = self.names(
            table.get("from_groups"), (*at, "from_groups"), f"{name}: approval.from_groups"
        )
        if not from_groups:
            self.problem(
                at if "from_groups" not in table else (*at, "from_groups"),
                f"{name}: approval needs from_groups, the groups whose members may approve",
            )
        each_of = self.names(table.get("each_of"), (*at, "each_of"), f"{name}: approval.each_of")
        outside = [g for g in each_of if g not in from_groups]
        if outside and from_groups:
            self.problem(
                (*at, "each_of"),
                f"{name}: each_of names {', '.join(outside)}, not in from_groups",
            )
        if len(each_of) > required:
            self.problem(
                (*at, "each_of"),
                f"{name}: each_of lists {len(each_of)} groups but only {required} approval"
                f"{'s are' if required > 1 else ' is'} required, so it can never be met",
            )
        if known is not None:
            for key, groups in (("from_groups", from_groups), ("each_of", each_of)):
                for group in groups:
                    if group not in known:
                        self.problem(
                            (*at, key),
                            f"{name}: approver group {group!r} is not in [approver_groups] known",
                        )
        auto = self.names(
            table.get("auto_approve_groups"),
            (*at, "auto_approve_groups"),
            f"{name}: approval.auto_approve_groups",
        )
        expires = self.duration(table, "expires_after", at, f"{name}: approval")
        return ApprovalRule(required, from_groups, each_of, expires, auto)

    def break_glass(self, name: str, spec: dict, max_duration: int | None) -> BreakGlassRule | None:
        table, at = self.section(name, spec, "break_glass")
        if table is None:
            return None
        found_before = len(self.problems)
        lists = {}
        for key, what in (("groups", "who may break glass"), ("reviewers", "who reviews it")):
            lists[key] = self.names(table.get(key), (*at, key), f"{name}: break_glass.{key}")
            if not lists[key]:
                self.problem(
                    at if key not in table else (*at, key),
                    f"{name}: break_glass needs {key}, the groups of {what}",
                )
        longest = self.duration(table, "max_duration", at, f"{name}: break_glass")
        if longest is None:  # an hour, or less when the entitlement's own maximum is less
            longest = min(3600, max_duration or 3600)
        elif max_duration and longest > max_duration:
            self.problem(
                (*at, "max_duration"),
                f"{name}: break_glass.max_duration {format_duration(longest)} is longer than "
                f"max_duration {format_duration(max_duration)}",
            )
        review_within = self.duration(table, "review_within", at, f"{name}: break_glass") or 86400
        if len(self.problems) > found_before:
            return None
        return BreakGlassRule(lists["groups"], lists["reviewers"], longest, review_within)

    def extend(self, name: str, spec: dict, max_duration: int | None) -> ExtendRule | None:
        table, at = self.section(name, spec, "extend")
        if table is None:
            return None
        step = self.duration(table, "max_step", at, f"{name}: extend", required=True)
        total = self.duration(table, "max_total", at, f"{name}: extend", required=True)
        if total and max_duration and total < max_duration:
            self.problem(
                (*at, "max_total"),
                f"{name}: extend.max_total {format_duration(total)} is shorter than "
                f"max_duration {format_duration(max_duration)}",
            )
        return ExtendRule(step or 0, total or 0)

    # --- shapes ---

    def table(self, value: object, at: tuple[str, ...], what: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(at, f"{what} must be a table")
            return {}
        return value

    def names(self, value: object, at: tuple[str, ...], what: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(at, f'{what} must be a list of names, like ["sre"]')
            return ()
        return tuple(value)

    def duration(
        self, table: dict, key: str, at: tuple[str, ...], what: str, required: bool = False
    ) -> int | None:
        if key not in table:
            if required:
                self.problem(at, f"{what}: {key} is missing")
            return None
        try:
            return parse_duration(table[key])
        except ValueError as exc:
            self.problem((*at, key), f"{what}: {key}: {exc}")
            return None

    def unknown_keys(
        self, table: dict, known: tuple[str, ...], at: tuple[str, ...], where: str
    ) -> None:
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            place = f"{where}: " if where else ""
            self.problem((*at, key), f"{place}unknown key {key!r}{hint}")


def _loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _hours(text: object) -> tuple[int, int] | None:
    """'08:00-18:00' -> (480, 1080) in minutes; an end at or before the start is overnight."""
    if not isinstance(text, str):
        return None
    found = re.fullmatch(r"\s*(\d\d):(\d\d)\s*-\s*(\d\d):(\d\d)\s*", text)
    if not found:
        return None
    h1, m1, h2, m2 = (int(part) for part in found.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 1440 or start == end:
        return None
    return start, end


# --- finding lines (tomllib gives none) -----------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?([^\[\]]+)\]\]?\s*(#.*)?$")
_KEY_PART = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([A-Za-z0-9_-]+)")


def _key_parts(text: str) -> tuple[str, ...]:
    return tuple(a or b or c for a, b, c in _KEY_PART.findall(text))


class _Lines:
    """Finds the line of a key path in the raw text: the `key =` line inside the section header
    `[a.b]` that holds it, else the section header itself. Good enough for a policy file."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers: dict[tuple[str, ...], int] = {}
        self.bodies: dict[tuple[str, ...], list[int]] = {(): []}
        current: tuple[str, ...] = ()
        for number, line in enumerate(self.lines, 1):
            header = _HEADER.match(line)
            if header:
                current = _key_parts(header[1])
                self.headers.setdefault(current, number)
                self.bodies.setdefault(current, [])
            else:
                self.bodies[current].append(number)

    def find(self, path: tuple[str, ...]) -> int | None:
        if path in self.headers:
            return self.headers[path]
        for cut in range(len(path) - 1, -1, -1):
            section, rest = path[:cut], path[cut:]
            if section not in self.bodies:
                continue
            for keep in range(len(rest), 0, -1):
                line = self._key_line(section, rest[:keep])
                if line:
                    return line
        for cut in range(len(path) - 1, 0, -1):
            if path[:cut] in self.headers:
                return self.headers[path[:cut]]
            for header, number in self.headers.items():  # [a.b.c] defines a.b implicitly
                if header[:cut] == path[:cut]:
                    return number
        return None

    def _key_line(self, section: tuple[str, ...], keys: tuple[str, ...]) -> int | None:
        quoted = [rf"(?:{re.escape(k)}|\"{re.escape(k)}\"|'{re.escape(k)}')" for k in keys]
        pattern = re.compile(r"^\s*" + r"\s*\.\s*".join(quoted) + r"\s*=")
        for number in self.bodies[section]:
            if pattern.match(self.lines[number - 1]):
                return number
        return None
