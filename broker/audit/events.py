"""The one vocabulary of audit entry types, written by `grants` and read by search, export and the
CLI. The values are part of the audit format: a value must never change (old entries are hashed
with it), and a new type is added here, never written as a bare string."""

from __future__ import annotations

from enum import StrEnum


class Entry(StrEnum):
    """An audit entry's `type`. A StrEnum: it is its value wherever it is compared, formatted or
    serialised, so canonical JSON (and the hash over it) holds the plain string."""

    # Asking and deciding
    REQUEST = "request"  # a grant was asked for
    DECISION = "decision"  # the policy's verdict on a request or an extension
    APPROVAL = "approval"  # one approver said yes
    DENIAL = "denial"  # an approver said no
    CANCEL = "cancel"  # the requester withdrew a pending request
    EXPIRE_UNAPPROVED = "expire_unapproved"  # not approved (or not activated) in time
    BREAK_GLASS = "break_glass"  # the emergency path was taken: no approval, review due
    REVIEW = "review"  # the break-glass review was recorded
    # Holding a credential
    ISSUE = "issue"  # Vault issued the credential
    ISSUE_FAILED = "issue_failed"  # issuing failed, or was abandoned by a dead process
    EXTEND = "extend"  # the window was extended and a new credential issued
    EXTEND_LOST = "extend_lost"  # an extension lost a race; what it issued is removed
    REPLACED = "replaced"  # an extension replaced a credential that cannot be revoked
    RELEASE = "release"  # the requester released the grant early
    EXPIRE = "expire"  # the window ended
    # Removing it
    REVOKE = "revoke"  # the revocation was sent
    VERIFY = "verify"  # whether the credential is proven gone
    REVOKE_FAILED = "revoke_failed"  # removal not verified: retrying, alerting
    RECONCILE = "reconcile"  # a credential Vault held that the broker did not expect
    # Tool tokens for agents (issue 12)
    TOKEN_ISSUED = "token_issued"  # noqa: S105 - an access token for a tool was handed to a task's agent
    TOKEN_REVOKED = "token_revoked"  # noqa: S105 - the agent revoked one of its access tokens (RFC 7009)
