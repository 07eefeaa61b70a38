"""The token endpoint's use cases (issue 12): exchange a task's subject token for an access token
for one of its tools (RFC 8693), say whether a token is still active (RFC 7662), and revoke one
(RFC 7009). Each token handed out is recorded (store and audit chain) in one transaction, after
the task is read again under the write lock; nothing is recorded when no token is handed out. It
signs through the callable it is given (the transit signer) and never holds a key."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..audit.events import Entry
from ..errors import TaskNotActive, TokenRefused, UnknownTask
from ..models import ACTIVE, Principal, isoformat, parse_time
from .tasks import Tasks

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - RFC 8693 §3
JTI_BYTES = 16


@dataclass(frozen=True)
class ExchangedToken:
    """What the token endpoint answers with: the signed token, its scopes, lifetime, tool."""

    access_token: str
    scope: str
    expires_in: int
    grant_id: str
    tool: str
    claims: dict[str, Any]


def jti_handle(jti: str) -> str:
    """What the store keeps of a jti: its SHA-256."""
    return hashlib.sha256(jti.encode()).hexdigest()


class Exchanging(Tasks):
    def exchange(
        self,
        principal: Principal,
        subject_token: object,
        resource: object,
        scope: object,
        sign: Callable[[Mapping[str, Any]], tuple[str, str]],
    ) -> ExchangedToken:
        """An access token for the tool `resource` of the task `subject_token` names, for `agent`
        (its authenticated client id), with `scope` (space-separated; None: all granted for the
        tool). `subject_token` is a task's subject token, or the Principal of the person's own
        access token (then the person's task that fits: tasks.task_for_person). Raises
        TokenRefused with the OAuth error code; nothing is recorded then."""
        agent = principal.client_id
        try:
            if isinstance(subject_token, Principal):  # the person's own access token, verified
                grant, task = self.task_for_person(subject_token, agent, resource, scope)
            else:
                grant, task = self.task_for_subject_token(subject_token)
        except (UnknownTask, TaskNotActive) as exc:
            raise TokenRefused("invalid_grant", exc.detail) from None
        if task.agent != agent:
            raise TokenRefused("invalid_grant", "the subject token names another agent's task")
        if not isinstance(resource, str) or not resource:
            raise TokenRefused("invalid_target", "resource must name one tool of the task")
        found = task.tool_for(resource)
        if found is None:
            raise TokenRefused("invalid_target", "the task holds no tool with this resource")
        tool, granted = found
        if scope is None or scope == "":
            scopes = tuple(granted)
        elif not isinstance(scope, str):
            raise TokenRefused("invalid_scope", "scope must be space-separated text")
        else:
            scopes = tuple(dict.fromkeys(scope.split()))
            beyond = [s for s in scopes if s not in granted]
            if beyond or not scopes:
                raise TokenRefused(
                    "invalid_scope", f"the task grants {tool.name} only {' '.join(granted)}"
                )
        now = self.clock()
        end = min(now + timedelta(seconds=tool.max_token_lifetime), task.window_end)
        iat, exp = int(now.timestamp()), int(end.timestamp())
        if exp <= iat:
            raise TokenRefused("invalid_grant", "the task's window is about to end")
        jti = secrets.token_urlsafe(JTI_BYTES)
        person = task.on_behalf_of
        claims: dict[str, Any] = {
            "aud": tool.resource,
            "sub": person["sub"] if person else agent,
            "act": {"sub": agent},
            "client_id": agent,
            "scope": " ".join(scopes),
            "jti": jti,
            "iat": iat,
            "exp": exp,
        }
        token, kid = sign(claims)
        with self.store.transaction() as tx:
            current = tx.get_grant(grant.id)
            if current is None or current.status != ACTIVE or current.handle != grant.handle:
                raise TokenRefused("invalid_grant", f"task {grant.id} closed meanwhile")
            tx.add_access_token(
                jti_hash=jti_handle(jti),
                grant_id=grant.id,
                tool=tool.name,
                agent=agent,
                issued_at=isoformat(now),
                exp=exp,
                revoked_at="",
            )
            self._log(
                tx,
                Entry.TOKEN_ISSUED,
                principal.actor(),
                grant.id,
                agent=agent,
                tool=tool.name,
                resource=tool.resource,
                scopes=list(scopes),
                jti=self._fingerprint(jti),
                kid=kid,
                exp=exp,
                sub=claims["sub"],
                # What named the task: its own subject token, or the person's access token.
                named_by="person_token" if isinstance(subject_token, Principal) else "task_token",
            )
        self.on_change()
        return ExchangedToken(token, claims["scope"], exp - iat, grant.id, tool.name, claims)

    def token_active(self, jti: str, exp: int) -> bool:
        """Whether a token (its signature already verified) was issued by this broker, is not
        revoked or expired, and its task is active and inside its window."""
        record = self.store.access_token(jti_handle(jti))
        now = self.clock()
        if record is None or record["revoked_at"] or min(exp, record["exp"]) <= now.timestamp():
            return False
        grant = self.store.get_grant(record["grant_id"])
        return grant is not None and grant.status == ACTIVE and parse_time(grant.window_end) > now

    def revoke_token(self, principal: Principal, jti: str) -> bool:
        """The agent revokes one of its tokens; True when something was revoked (then recorded)."""
        agent = principal.client_id
        with self.store.transaction() as tx:
            grant_id = tx.revoke_access_token(jti_handle(jti), agent, self._now())
            if grant_id is None:
                return False
            self._log(
                tx,
                Entry.TOKEN_REVOKED,
                principal.actor(),
                grant_id,
                agent=agent,
                jti=self._fingerprint(jti),
            )
        self.on_change()
        return True
