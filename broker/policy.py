"""The task-window policy: which entitlements exist, who may hold them and for how long. Loads and
evaluates a policy file; never issues, stores or audits anything itself."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .durations import format_duration, parse_duration
from .errors import ConfigError
from .models import Decision, Principal

ENTITLEMENT_KEYS = {"description", "groups", "max_duration", "backend", "vault_policies"}
BACKENDS = {"vault_token"}


@dataclass(frozen=True)
class Entitlement:
    name: str
    description: str
    groups: tuple[str, ...]
    max_duration: int
    backend: str
    vault_policies: tuple[str, ...]

    def admits(self, principal: Principal) -> bool:
        return bool(set(self.groups) & set(principal.groups))


@dataclass(frozen=True)
class Policy:
    entitlements: dict[str, Entitlement]
    version: str  # sha256 of the file's bytes: the decision names the exact text it applied

    def eligible(self, principal: Principal) -> list[Entitlement]:
        return [e for e in self.entitlements.values() if e.admits(principal)]

    def evaluate(self, principal: Principal, entitlement: str, duration: int) -> Decision:
        """Apply every rule and say why; the first failing rule's code becomes the error."""
        found = self.entitlements.get(entitlement)
        if found is None:
            return self._deny(
                entitlement,
                duration,
                "unknown_entitlement",
                f"no entitlement named {entitlement!r} in the policy",
            )
        if not found.admits(principal):
            return self._deny(
                entitlement,
                duration,
                "not_eligible",
                f"{entitlement} needs membership of one of "
                f"{', '.join(found.groups)}; {principal.display} is in "
                f"{', '.join(principal.groups) or 'no groups'}",
            )
        if duration > found.max_duration:
            return self._deny(
                entitlement,
                duration,
                "duration_too_long",
                f"{format_duration(duration)} is longer than the maximum "
                f"{format_duration(found.max_duration)} for {entitlement}",
            )
        reasons = (
            f"member of {', '.join(sorted(set(found.groups) & set(principal.groups)))}",
            f"{format_duration(duration)} within the maximum {format_duration(found.max_duration)}",
        )
        return Decision(True, entitlement, duration, reasons, self.version)

    def _deny(self, entitlement: str, duration: int, code: str, reason: str) -> Decision:
        return Decision(False, entitlement, duration, (reason,), self.version, error=code)


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file, raising ConfigError naming every problem found."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"policy file {path} does not exist") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy file {path} is not valid TOML: {exc}") from None
    problems: list[str] = []
    unknown = set(data) - {"entitlements"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)}")
    entitlements = {}
    for name, spec in (data.get("entitlements") or {}).items():
        entitlement = _entitlement(name, spec, problems)
        if entitlement:
            entitlements[name] = entitlement
    if problems:
        raise ConfigError(f"policy file {path}: " + "; ".join(problems))
    return Policy(entitlements, hashlib.sha256(raw).hexdigest())


def _entitlement(name: str, spec: object, problems: list[str]) -> Entitlement | None:
    where = f"entitlements.{name}"
    if not isinstance(spec, dict):
        problems.append(f"{where} must be a table")
        return None
    for key in sorted(set(spec) - ENTITLEMENT_KEYS):
        problems.append(f"{where}: unknown key {key!r}")
    try:
        max_duration = parse_duration(spec.get("max_duration", ""))
    except ValueError as exc:
        problems.append(f"{where}.max_duration: {exc}")
        max_duration = 0
    backend = spec.get("backend", "vault_token")
    if backend not in BACKENDS:
        problems.append(f"{where}.backend: unknown backend {backend!r}")
    groups = _strings(spec.get("groups"), f"{where}.groups", problems)
    policies = _strings(spec.get("vault_policies"), f"{where}.vault_policies", problems)
    if "root" in policies:
        problems.append(f"{where}.vault_policies: the root policy is never granted")
    return Entitlement(
        name, str(spec.get("description", "")), groups, max_duration, backend, policies
    )


def _strings(value: object, where: str, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{where} must be a non-empty list of names")
        return ()
    return tuple(value)
