"""The broker's error types. Each carries the HTTP status it maps to, so `web` translates them
in one place; nothing here knows about Flask."""

from collections.abc import Sequence


class BrokerError(Exception):
    """A failure the caller can understand: it has a short code, a readable detail and a status."""

    status = 400
    code = "bad_request"

    def __init__(self, detail: str, **context: Sequence[str]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.context = context


class InvalidRequest(BrokerError):
    status = 400
    code = "invalid_request"


class InvalidDuration(InvalidRequest):
    code = "invalid_duration"


class Unauthenticated(BrokerError):
    status = 401
    code = "unauthenticated"


class Forbidden(BrokerError):
    status = 403
    code = "forbidden"


class InvalidToken(Unauthenticated):
    """A tool was sent an access token it must refuse (RFC 6750 §3.1 `invalid_token`): malformed,
    expired, badly signed, made for another tool, or no longer active."""

    code = "invalid_token"


class InsufficientScope(Forbidden):
    """A valid access token that lacks the scope an action needs (RFC 6750 §3.1); `scope` is
    what the tool tells the client to ask for."""

    code = "insufficient_scope"

    def __init__(self, detail: str, scope: str) -> None:
        super().__init__(detail)
        self.scope = scope


class GrantNotFound(BrokerError):
    status = 404
    code = "not_found"


class UnknownTask(GrantNotFound):
    """No task grant holds this subject token (never issued, or replaced by an extension)."""

    code = "unknown_task"


class TaskNotActive(BrokerError):
    """The task exists but is not active now: pending, approved but not started, or closed.
    `status_of_task` says which state it is in, for the caller's error message."""

    status = 400
    code = "task_not_active"

    def __init__(self, detail: str, status_of_task: str) -> None:
        super().__init__(detail)
        self.status_of_task = status_of_task


class CliLoginOff(BrokerError):
    """This broker publishes no login for the CLI ([cli] client_id is empty)."""

    status = 404
    code = "cli_login_off"


class GrantConflict(BrokerError):
    """The grant is not in a state that allows the action (already released, already revoked...)."""

    status = 409
    code = "conflict"


class VaultUnavailable(BrokerError):
    status = 503
    code = "vault_unavailable"


class DatabaseUnavailable(BrokerError):
    """The database a credential lives in cannot be reached or asked (to verify a removal)."""

    status = 503
    code = "database_unavailable"


class StoreUnavailable(BrokerError):
    """The broker's own database cannot be used now (full, read-only, an I/O error, locked past
    the timeout). What was being written was rolled back, so nothing was changed or issued."""

    status = 503
    code = "store_unavailable"


class BrokerUnhealthy(BrokerError):
    """The broker cannot keep its promises (audit log not writable, reaper not running), so it
    issues nothing new until it can. Releases and removals go on."""

    status = 503
    code = "broker_unhealthy"


class ConfigError(Exception):
    """The broker's own configuration or policy file is wrong; raised at start, never to a user."""


class VaultRejected(BrokerError):
    """Vault answered, but refused the broker's call: a misconfiguration, not the user's fault."""

    status = 502
    code = "vault_rejected"


class ProviderUnavailable(BrokerError):
    """The OIDC provider (its discovery document or JWKS) cannot be reached."""

    status = 503
    code = "identity_provider_unavailable"


class PolicyRefused(BrokerError):
    """A policy rule said no. `code` names the rule, so the API tells which one refused."""

    STATUS = {
        "unknown_entitlement": 404,
        "not_eligible": 403,
        "invalid_duration": 400,
        "limit_reached": 409,
        "agent_cannot_approve": 403,
        "self_approval": 403,
        "not_an_approver": 403,
        "already_approved": 409,
        "no_approval_needed": 409,
        "no_break_glass": 403,
        "agent_cannot_review": 403,
        "self_review": 403,
        "not_a_reviewer": 403,
        "already_reviewed": 409,
        "not_break_glass": 409,
        "task_required": 400,
        "not_a_task": 400,
        "unknown_tool": 404,
        "tool_not_allowed": 403,
        "scope_not_allowed": 403,
        "agent_not_allowed": 403,
        "agent_may_not_start": 403,
        "not_own_task": 403,
    }

    def __init__(self, code: str, detail: str, **context: Sequence[str]) -> None:
        super().__init__(detail, **context)
        self.code = code
        self.status = self.STATUS.get(code, 422)


class SigningKeyUnavailable(BrokerError):
    """The access-token signing key in OpenBao's transit engine is missing or not an ES256 key:
    the broker can sign no access token, and publishes no key, until an operator makes it."""

    status = 503
    code = "signing_key_unavailable"


class TokenRefused(BrokerError):
    """The token endpoint refuses an exchange; `code` is the OAuth error (RFC 6749 §5.2, RFC 8693
    §2.2.2, RFC 8707): invalid_grant, invalid_target, invalid_scope, unauthorized_client."""

    status = 400

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
