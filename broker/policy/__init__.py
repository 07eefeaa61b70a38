"""The task-window policy: which entitlements exist, who may request them, for how long, when, with
what reason, and who must approve. Loads, checks, decides and explains; never issues, stores or
audits anything, and imports nothing of the broker but plain data types.

The entry points: load_policy (a file), check_policy_text (text), decide and explain (a request),
PolicyFile (the file the broker serves from, reloaded when it changes)."""

from .decide import Policy, decide
from .explain import explain
from .model import (
    ApprovalRule,
    BreakGlassRule,
    DatabaseOptions,
    Entitlement,
    ExtendRule,
    ReasonRule,
    Requesters,
    Schedule,
    SshOptions,
)
from .parse import PolicyError, Problem, check_policy_text, load_policy
from .reload import PolicyFile

__all__ = [
    "ApprovalRule",
    "BreakGlassRule",
    "DatabaseOptions",
    "Entitlement",
    "ExtendRule",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Problem",
    "ReasonRule",
    "Requesters",
    "Schedule",
    "SshOptions",
    "check_policy_text",
    "decide",
    "explain",
    "load_policy",
]
