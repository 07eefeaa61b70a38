"""Plain data shared across the broker: who asks, what policy decided, what a grant is. Frozen
dataclasses with no behaviour that touches the outside world."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    """UTC ISO 8601 with a Z, the one time format of the API and the audit log."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


STANDARD_CLAIMS = frozenset(
    {"iss", "sub", "kind", "name", "email", "email_verified", "groups", "client_id"}
)


def extra_claims(claims: dict, exclude: frozenset) -> tuple[tuple[str, str | tuple[str, ...]], ...]:
    """The claims worth keeping beyond the standard ones: text, or lists of text."""
    kept: list[tuple[str, str | tuple[str, ...]]] = []
    for name, value in sorted(claims.items()):
        if name in exclude:
            continue
        if isinstance(value, str):
            kept.append((name, value))
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            kept.append((name, tuple(value)))
    return tuple(kept)


def verified_email(email: str, verified: bool) -> str:
    """The address as the broker compares it (case-insensitively), or "" when the provider did
    not vouch that its holder controls it: an unverified address is a claim anyone can make."""
    return email.strip().lower() if verified and email.strip() else ""


@dataclass(frozen=True)
class Person:
    """Who someone is for separation of duties. One person may hold several identities at the
    provider; two are taken for the same person when they are the same account (issuer and
    subject) or share a verified email address. Unverified addresses never match."""

    issuer: str
    subject: str
    email: str = ""  # verified and lower-cased (verified_email), or ""

    def is_same_as(self, other: Person) -> bool:
        if (self.issuer, self.subject) == (other.issuer, other.subject):
            return True
        return bool(self.email) and self.email == other.email


@dataclass(frozen=True)
class Principal:
    """An authenticated requester, as the OIDC provider vouched for them."""

    issuer: str
    subject: str
    kind: str = "human"  # "human" (browser or CLI login) or "agent" (client credentials)
    name: str = ""
    email: str = ""
    groups: tuple[str, ...] = ()
    client_id: str = ""
    email_verified: bool = False  # the provider vouches that the person controls `email`
    # The provider's other identity claims (department, cost centre...), for policy rules that
    # match any claim, and for the audit chain's record of who asked.
    extra: tuple[tuple[str, str | tuple[str, ...]], ...] = ()

    @property
    def display(self) -> str:
        return self.email or self.name or self.subject

    def actor(self) -> dict:
        """The identity as the audit log records it."""
        return {"iss": self.issuer, "sub": self.subject}

    @property
    def person(self) -> Person:
        return Person(self.issuer, self.subject, verified_email(self.email, self.email_verified))

    @classmethod
    def from_claims(cls, claims: dict) -> Principal:
        """The inverse of claims(), for a principal kept in the web session."""
        return cls(
            issuer=claims["iss"],
            subject=claims["sub"],
            kind=claims["kind"],
            email=claims["email"],
            name=claims["name"],
            groups=tuple(claims["groups"]),
            client_id=claims["client_id"],
            email_verified=claims.get("email_verified") is True,
            extra=extra_claims(claims, exclude=STANDARD_CLAIMS),
        )

    def claims(self) -> dict:
        """The identity claims the decision used, for the audit chain."""
        return {
            "iss": self.issuer,
            "sub": self.subject,
            "kind": self.kind,
            "email": self.email,
            "email_verified": self.email_verified,
            "name": self.name,
            "groups": list(self.groups),
            "client_id": self.client_id,
            **{
                name: list(value) if isinstance(value, tuple) else value
                for name, value in self.extra
            },
        }


@dataclass(frozen=True)
class Decision:
    """What the policy said about one request, with every reason, under which policy version."""

    allowed: bool
    entitlement: str
    duration: int  # seconds, after the entitlement's default_duration was applied
    reasons: tuple[str, ...]
    policy_hash: str
    error: str = ""  # the error code of the first rule that refused
    approvals_required: int = 0  # 0: issue at once
    auto_approved: str = ""  # the auto-approve condition that matched, recorded as such
    approvers: tuple[str, ...] = ()  # the groups whose members could approve


@dataclass(frozen=True)
class Approval:
    """One person's approval of one request."""

    issuer: str
    subject: str
    display: str
    groups: tuple[str, ...]
    at: str
    email: str = ""  # the approver's verified email (verified_email), "" when none

    @property
    def person(self) -> Person:
        return Person(self.issuer, self.subject, self.email)


@dataclass(frozen=True)
class Refusal:
    """Why a rule said no: a stable code for the API and a sentence for people."""

    code: str
    message: str


@dataclass(frozen=True)
class IssuedCredential:
    """What a backend issued. `secret` is handed to the requester once and never stored."""

    secret: str = field(repr=False)  # kept out of reprs, so out of logs and tracebacks
    handle: str = field(repr=False)  # what revokes and verifies it (a token accessor, a lease id)
    expires_at: datetime
    kind: str
    details: dict = field(default_factory=dict)  # non-secret facts: policies, ttl, request id
    # Shown to the requester with the secret, but in the audit log only as HMACs (a user name).
    private: dict = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Holding:
    """Something Vault holds for this broker, as a backend's listing found it: which grant it
    names, the handle its backend revokes and verifies it by, and non-secret facts for the audit
    chain (never the handle itself, which the chain only holds as an HMAC)."""

    grant_id: str
    handle: str = field(repr=False)
    description: str
    issued_at: datetime | None = None  # when Vault made it (an issuance may still be in flight)
    # Issued before credentials were tagged with the broker that made them: claimed only when this
    # broker's store knows the grant, since another broker sharing the Vault may have made it.
    legacy: bool = False


@dataclass(frozen=True)
class Credential:
    """One credential a grant holds or once held, in the order issued. Every one is listed, not
    only the grant's current one, so nothing says `revoked` while a replaced or raced one lives.
    `handle` is "" while an extension is being issued (its claim: one at a time per grant);
    `gone_at` is set once its removal was verified. `issuing_process` is the broker process that
    made the claim ("": unknown, judged by the grace period), as for `Grant.issuing_process`."""

    id: str
    grant_id: str
    backend: str
    handle: str = field(repr=False)
    issued_at: str
    gone_at: str = ""
    issuing_process: str = ""


@dataclass(frozen=True)
class Task:
    """What a task grant lets one agent do: which tools, with which scopes. The policy checks it
    against the entitlement's task rule, the grant records it, and the token endpoint hands out
    no more than it."""

    agent: str  # the agent's OIDC client id
    tools: tuple[tuple[str, tuple[str, ...]], ...]  # (tool, scopes), both sorted

    @classmethod
    def of(cls, agent: str, tools: dict[str, list[str]] | dict[str, tuple[str, ...]]) -> Task:
        return cls(agent, tuple(sorted((t, tuple(sorted(set(s)))) for t, s in tools.items())))

    def scopes_for(self, tool: str) -> tuple[str, ...]:
        """The scopes granted for `tool`; () when the task does not name it."""
        return dict(self.tools).get(tool, ())

    def tools_json(self) -> dict[str, list[str]]:
        return {tool: list(scopes) for tool, scopes in self.tools}

    def describe(self) -> str:
        used = "; ".join(f"{tool} ({', '.join(scopes)})" for tool, scopes in self.tools)
        return f"agent {self.agent} with {used}"


# Grant states (DESIGN.md). `approved` waits for the requester to activate it: the credential goes
# to them alone, and their eligibility is checked again with fresh claims when it is issued.
# `issuing` is the broker's recorded intent before it calls Vault.
PENDING, APPROVED = "pending", "approved"
DENIED, EXPIRED_UNAPPROVED, CANCELLED = "denied", "expired_unapproved", "cancelled"
ISSUING, ISSUE_FAILED, ACTIVE = "issuing", "issue_failed", "active"
RELEASED, EXPIRED, REVOKING = "released", "expired", "revoking"
REVOKED, REVOKE_FAILED = "revoked", "revoke_failed"
# Every state, in the order of a grant's life.
STATES = (PENDING, APPROVED, DENIED, EXPIRED_UNAPPROVED, CANCELLED, ISSUING, ISSUE_FAILED, ACTIVE,
          RELEASED, EXPIRED, REVOKING, REVOKED, REVOKE_FAILED)  # fmt: skip
TO_REAP = (RELEASED, EXPIRED, REVOKING, REVOKE_FAILED)


@dataclass(frozen=True)
class Grant:
    id: str
    requester_iss: str
    requester_sub: str
    requester: str
    entitlement: str
    reason: str
    duration: int
    status: str
    created_at: str
    window_start: str
    window_end: str
    backend: str
    policy_hash: str
    handle: str = ""
    credential_expires_at: str = ""
    attempts: int = 0
    due_at: str = ""  # when the reaper must next look at it ("" for never): expiry, retry
    last_error: str = ""
    updated_at: str = ""
    ticket: str = ""
    approvals_required: int = 0
    closed_reason: str = ""  # why it was denied, cancelled or refused at activation
    break_glass: int = 0  # 1: the emergency path, issued without approval; must be reviewed
    review_due: str = ""  # a break-glass grant's review deadline
    reviewed_at: str = ""
    reviewed_by: str = ""
    # The broker process that took it to `issuing` (liveness.py): while that process lives the
    # issuance may be in flight; once it is dead, whatever it left is settled at once. Once it is
    # `revoking`: the process that holds the removal's claim, taken over at once if it dies.
    issuing_process: str = ""
    requester_email: str = ""  # verified, lower-cased, at request time ("" if none; schema v4)
    # A task grant (schema v5): the agent it is for, its tools and scopes as canonical JSON
    # ({tool: [scopes]}), and who started it: "person" (on their behalf) or "agent" (its own).
    task_agent: str = ""
    task_tools: str = ""
    task_started_by: str = ""

    @property
    def task(self) -> Task | None:
        """The task this grant is, or None for a grant of a credential."""
        if not self.task_agent:
            return None
        return Task.of(self.task_agent, json.loads(self.task_tools or "{}"))

    @property
    def requester_person(self) -> Person:
        return Person(self.requester_iss, self.requester_sub, self.requester_email)

    def owned_by(self, principal: Principal) -> bool:
        return (self.requester_iss, self.requester_sub) == (principal.issuer, principal.subject)

    def as_json(self) -> dict:
        """The API's view of a grant: never the handle, never a secret."""
        return {
            "id": self.id,
            "entitlement": self.entitlement,
            "status": self.status,
            "requester": self.requester,
            "reason": self.reason,
            "duration": self.duration,
            "created_at": self.created_at,
            "window": {"start": self.window_start, "end": self.window_end},
            "credential_expires_at": self.credential_expires_at or None,
            "last_error": self.last_error or None,
            "ticket": self.ticket or None,
            "closed_reason": self.closed_reason or None,
            "break_glass": bool(self.break_glass),
            **(
                {
                    "task": {
                        "agent": self.task_agent,
                        "tools": json.loads(self.task_tools or "{}"),
                        "started_by": self.task_started_by,
                        "on_behalf_of": self.requester
                        if self.task_started_by == "person"
                        else None,
                    }
                }
                if self.task_agent
                else {}
            ),
            **(
                {
                    "review": {
                        "due": self.review_due,
                        "at": self.reviewed_at or None,
                        "by": self.reviewed_by or None,
                    }
                }
                if self.break_glass
                else {}
            ),
        }
