"""The task-window policy: which entitlements exist, who may request them, for how long, when, with
what reason, and who must approve. Loads, checks, decides and explains; never issues, stores or
audits anything, and imports nothing of the broker but plain data types.

The entry points: load_policy (a file), check_policy_text (text), decide and explain (a request),
PolicyFile (the file the broker serves from, reloaded when it changes). The credential kinds are
not the policy's: the loaders take them from the caller (KindReader, with its options table)."""

from .decide import Policy, decide
from .explain import explain
from .kinds import KindReader, OptionsReader
from .model import (
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
from .parse import PolicyError, Problem, check_policy_text, load_policy
from .reload import PolicyFile

__all__ = [
    "ApprovalRule",
    "BreakGlassRule",
    "Entitlement",
    "ExtendRule",
    "KindReader",
    "OptionsReader",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Problem",
    "ReasonRule",
    "Requesters",
    "Schedule",
    "TaskRule",
    "Tool",
    "check_policy_text",
    "decide",
    "explain",
    "load_policy",
]
