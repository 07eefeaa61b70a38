"""Requesting, activating and extending: the policy is checked, the intent recorded, Vault
asked, and the credential recorded or, when that fails, revoked at once (layer 4). Break-glass is
the same path past approvals, with a loud alert and a review to follow."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from datetime import timedelta

from .. import notify
from ..audit.events import Entry
from ..durations import parse_duration
from ..errors import (
    BrokerError,
    BrokerUnhealthy,
    GrantConflict,
    InvalidDuration,
    InvalidRequest,
    PolicyRefused,
    StoreUnavailable,
)
from ..models import (
    ACTIVE,
    APPROVED,
    DENIED,
    ISSUE_FAILED,
    ISSUING,
    PENDING,
    Credential,
    Decision,
    Grant,
    IssuedCredential,
    Principal,
    Task,
    isoformat,
    parse_time,
)
from ..policy import BreakGlassRule, Entitlement, Policy
from .base import (
    OPEN,
    _raise_if_refused,
    _validated,
    log,
)
from .health import Health
from .removal import Removing, _first_look
from .tasks import task_asked


class Issuing(Removing, Health):
    """Needs Removing (an extension's old or losing credential is removed and verified) and
    Health (nothing is issued while the broker is unhealthy)."""

    def request(
        self,
        principal: Principal,
        entitlement: object,
        duration: object,
        reason: object,
        ticket: object = "",
        public_key: object = "",
        break_glass: object = False,
        agent: object = None,
        tools: object = None,
    ) -> tuple[Grant, IssuedCredential | None]:
        """Check the policy; then either issue at once, or record a pending request that waits
        for approvals. Bad input and refusals leave no trace; a Vault failure leaves a grant
        marked issue_failed, never one that claims a credential. `public_key` is what an SSH
        certificate is signed for; it is needed when issuing (now, or at activation).
        `break_glass` takes the emergency path: issued at once, reviewed afterwards. `agent` and
        `tools` ask for a task grant: that agent may get tokens for those tools and scopes in the
        window, started by the principal (a person on their own behalf, or the agent itself)."""
        if not isinstance(break_glass, bool):
            raise InvalidRequest("break_glass must be true or false")
        task = task_asked(agent, tools)
        if task is not None and break_glass:
            raise InvalidRequest("a task has no break-glass path")
        entitlement, seconds, reason, ticket = _validated(entitlement, duration, reason, ticket)
        self._refuse_if_unhealthy()
        policy = self.policy()
        if break_glass:
            return self._break_glass(policy, principal, entitlement, seconds, reason, public_key)
        open_now = self._open_now(policy, principal, entitlement)
        decision = policy.evaluate(
            principal,
            entitlement,
            seconds,
            reason=reason,
            ticket=ticket,
            now=self.clock(),
            active=open_now,
            task=task,
        )
        if not decision.allowed:  # a refusal is not recorded, but it is counted
            self.metrics.decisions.labels("refused").inc()
        _raise_if_refused(decision)
        chosen = policy.entitlements[entitlement]
        status = PENDING if decision.approvals_required else ISSUING
        if status == ISSUING:
            self._check_request(chosen, public_key)
        grant = self._record_request(
            policy, principal, chosen, decision, reason, ticket, status, task=task
        )
        if status == PENDING:
            self.notify(
                notify.NEW_REQUEST,
                notify.new_request_text(grant),
                grant_id=grant.id,
                audience="approvers",
                fields={"approvers": ", ".join(decision.approvers)},
            )
            self._changed(grant.due_at)  # the reaper must expire it if nobody approves
            return grant, None
        return self._issue(principal, grant, chosen, public_key)

    def _open_now(
        self, policy: Policy, principal: Principal, entitlement: str, excluding: str = ""
    ) -> int:
        """The principal's open grants of the entitlement, for its `max_active`; counted only
        when it has one (nothing else reads it): a read saved on every request."""
        found = policy.entitlements.get(entitlement)
        if found is None or found.max_active is None:
            return 0
        return self.store.count_open(
            principal.issuer, principal.subject, entitlement, OPEN, excluding=excluding
        )

    def _check_request(self, chosen: Entitlement, public_key: object) -> None:
        """What the backend needs from the requester, checked before anything is recorded."""
        self.backends[chosen.backend].check_request(public_key)

    def _record_request(
        self,
        policy: Policy,
        principal: Principal,
        chosen: Entitlement,
        decision: Decision,
        reason: str,
        ticket: str,
        status: str,
        glass: BreakGlassRule | None = None,
        task: Task | None = None,
    ) -> Grant:
        """Record the request and the decision, in one transaction. `glass` (the entitlement's
        break-glass rule) marks a break-glass grant: its window ignores the schedule, and its
        review falls due. `task` marks a task grant, started by the principal: the agent itself,
        or a person on whose behalf the agent will act."""
        now = self.clock().replace(microsecond=0)
        start, end, due, review_due = "", "", "", ""
        if glass is not None:
            start = isoformat(now)
            end = isoformat(now + timedelta(seconds=decision.duration))
            review_due = isoformat(now + timedelta(seconds=glass.review_within))
        elif status == ISSUING:
            start = isoformat(now)
            end = isoformat(policy.window_end(chosen.name, now, decision.duration))
        else:
            due = isoformat(now + self._request_ttl(chosen))
        grant = Grant(
            id=str(uuid.uuid4()),
            requester_iss=principal.issuer,
            requester_sub=principal.subject,
            requester_email=principal.person.email,
            requester=principal.display,
            entitlement=chosen.name,
            reason=reason,
            duration=decision.duration,
            status=status,
            created_at=isoformat(now),
            window_start=start,
            window_end=end,
            backend=chosen.backend,
            policy_hash=decision.policy_hash,
            due_at=due,
            updated_at=isoformat(now),
            ticket=ticket,
            approvals_required=decision.approvals_required,
            break_glass=int(glass is not None),
            review_due=review_due,
            issuing_process=self.process_id if status == ISSUING else "",
            task_agent=task.agent if task else "",
            task_tools=json.dumps(task.tools_json(), sort_keys=True) if task else "",
            task_started_by=("agent" if principal.kind == "agent" else "person") if task else "",
        )
        task_record = _task_record(grant, principal)
        with self.store.transaction() as tx:
            tx.insert_grant(grant)
            self._log(
                tx,
                Entry.REQUEST,
                principal.actor(),
                grant.id,
                principal=principal.claims(),
                entitlement=chosen.name,
                duration=decision.duration,
                reason=reason,
                ticket=ticket or None,
                break_glass=grant.break_glass == 1 or None,
                task=task_record,
            )
            self._log_decision(tx, principal, grant.id, decision, task=task_record)
            if glass is not None:
                self._log(
                    tx,
                    Entry.BREAK_GLASS,
                    principal.actor(),
                    grant.id,
                    entitlement=chosen.name,
                    reason=reason,
                    duration=decision.duration,
                    window_end=end,
                    review_due=review_due,
                    reviewers=list(glass.reviewers),
                )
        return grant

    def _break_glass(
        self,
        policy: Policy,
        principal: Principal,
        entitlement: str,
        seconds: int | None,
        reason: str,
        public_key: object,
    ) -> tuple[Grant, IssuedCredential]:
        """The emergency path: no approval, no ticket, no schedule; a loud alert, and a review
        that falls due. Issued through the same intent-then-record steps as any grant."""
        decision = policy.evaluate_break_glass(principal, entitlement, seconds, reason)
        _raise_if_refused(decision)
        chosen = policy.entitlements[entitlement]
        glass = chosen.break_glass
        if glass is None:  # allowed above only when the entitlement has a break-glass rule
            raise PolicyRefused("no_break_glass", f"{entitlement} has no break-glass path")
        self._check_request(chosen, public_key)
        grant = self._record_request(
            policy,
            principal,
            chosen,
            decision,
            reason,
            "",
            ISSUING,
            glass,
        )
        self.notify(
            notify.BREAK_GLASS,
            notify.break_glass_text(grant),
            grant_id=grant.id,
            audience="security",
            fields={"reviewers": ", ".join(glass.reviewers)},
        )
        return self._issue(principal, grant, chosen, public_key)

    def activate(
        self, principal: Principal, grant_id: str, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        """Issue an approved request to its requester. The policy is applied again with the
        requester's claims of now: whoever left the group while waiting gets nothing."""
        grant = self.get(principal, grant_id, owner_only=True)
        self._refuse_if_unhealthy()
        policy = self.policy()
        if grant.entitlement in policy.entitlements:
            self._check_request(policy.entitlements[grant.entitlement], public_key)
        open_now = self._open_now(policy, principal, grant.entitlement, excluding=grant.id)
        decision = policy.evaluate(
            principal,
            grant.entitlement,
            grant.duration,
            reason=grant.reason,
            ticket=grant.ticket,
            now=self.clock(),
            active=open_now,
            task=grant.task,
        )
        now = self.clock().replace(microsecond=0)
        with self.store.transaction() as tx:
            current = self._current(grant.id, tx)
            if current.status != APPROVED:
                raise GrantConflict(f"request {grant.id} is {current.status}, not approved")
            if not decision.allowed:
                tx.move_grant(
                    grant.id,
                    APPROVED,
                    status=DENIED,
                    due_at="",
                    closed_reason=f"refused at activation: {decision.reasons[0]}",
                    updated_at=isoformat(now),
                )
            else:
                end = policy.window_end(grant.entitlement, now, grant.duration)
                tx.move_grant(
                    grant.id,
                    APPROVED,
                    status=ISSUING,
                    window_start=isoformat(now),
                    window_end=isoformat(end),
                    due_at="",
                    updated_at=isoformat(now),
                    issuing_process=self.process_id,
                )
            self._log_decision(tx, principal, grant.id, decision, at_activation=True)
        _raise_if_refused(decision)
        grant = self._current(grant.id)
        return self._issue(principal, grant, policy.entitlements[grant.entitlement], public_key)

    def _issue(
        self, principal: Principal, grant: Grant, chosen: Entitlement, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        backend = self.backends[chosen.backend]
        started = time.perf_counter()
        try:
            credential = backend.issue(
                grant.id, chosen, parse_time(grant.window_end), principal.display, public_key
            )
        except BrokerError as exc:
            with self.store.transaction() as tx:
                tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=ISSUE_FAILED,
                    last_error=exc.detail,
                    updated_at=self._now(),
                )
                self._log(
                    tx,
                    Entry.ISSUE_FAILED,
                    principal.actor(),
                    grant.id,
                    backend=chosen.backend,
                    error=exc.detail,
                )
            self.metrics.issue_failures.labels(chosen.backend).inc()
            raise
        # The grant as this issuance leaves it: what the answer shows, read from nowhere again.
        issued = replace(
            grant,
            status=ACTIVE,
            handle=credential.handle,
            credential_expires_at=isoformat(credential.expires_at),
            due_at=_first_look(grant),
            updated_at=self._now(),
        )
        try:
            with self.store.transaction() as tx:
                if not tx.move_grant(
                    grant.id,
                    ISSUING,
                    status=issued.status,
                    handle=issued.handle,
                    credential_expires_at=issued.credential_expires_at,
                    due_at=issued.due_at,
                    updated_at=issued.updated_at,
                ):
                    # The reconciler gave it up as abandoned: what Vault just issued must go.
                    raise GrantConflict(f"grant {grant.id} stopped issuing while Vault answered")
                tx.add_credential(_credential_of(grant, credential.handle, self._now()))
                self._log(
                    tx,
                    Entry.ISSUE,
                    principal.actor(),
                    grant.id,
                    backend=chosen.backend,
                    **self._marks(backend, credential.handle),
                    **credential.details,
                )
            self.metrics.issued.labels(chosen.backend).inc()
            self.metrics.issue_seconds.labels(chosen.backend).observe(time.perf_counter() - started)
        except StoreUnavailable as exc:
            backend.revoke(credential.handle)  # no record of it, so it must not exist
            raise StoreUnavailable(
                f"{exc.detail}. The issued credential could not be recorded, so it was revoked "
                "at once; nothing was issued"
            ) from exc
        except BrokerError:
            backend.revoke(credential.handle)
            raise
        except Exception as exc:
            # No record of the credential means the credential must not exist either.
            backend.revoke(credential.handle)
            log.exception("grant %s: the issued credential could not be recorded", grant.id)
            raise BrokerUnhealthy(
                "the issued credential could not be recorded in the audit log, "
                "so it was revoked at once; nothing was issued"
            ) from exc
        self._changed(issued.due_at)
        return issued, credential

    def extend(
        self, principal: Principal, grant_id: str, extra: object, public_key: object = ""
    ) -> tuple[Grant, IssuedCredential]:
        """Make a live window longer, within the policy's extension rules. A credential cannot
        outlive its own hard expiry (a token's explicit_max_ttl), so the longer window gets a new
        credential, shown once, and the old one is revoked. Were that revocation to fail, the old
        credential stays on the grant's list, so the grant is never `revoked` before it is gone
        (and it dies at the old window end anyway, inside the new window). Of extensions racing
        on one grant, one wins and the others get a 409 with nothing left behind."""
        if extra is None or extra == "":
            raise InvalidDuration("duration is required: how much longer (like 15m)")
        try:
            seconds = parse_duration(extra)
        except ValueError as exc:
            raise InvalidDuration(str(exc)) from None
        grant = self.get(principal, grant_id, owner_only=True)
        if grant.status != ACTIVE:
            raise GrantConflict(
                f"grant {grant.id} is {grant.status}: only an active grant can be extended"
            )
        self._refuse_if_unhealthy()
        policy = self.policy()
        start, end = parse_time(grant.window_start), parse_time(grant.window_end)
        decision = policy.evaluate_extension(
            principal, grant.entitlement, start, end, seconds, self.clock()
        )
        _raise_if_refused(decision)
        chosen = policy.entitlements[grant.entitlement]
        self._check_request(chosen, public_key)
        new_end = end + timedelta(seconds=seconds)
        backend = self.backends[chosen.backend]
        claim = self._claim_extension(grant)
        try:
            credential = backend.issue(grant.id, chosen, new_end, principal.display, public_key)
        except BaseException:
            with self.store.transaction() as tx:
                tx.drop_claim(claim.id)
            raise
        try:
            with self.store.transaction() as tx:
                tx.record_handle(claim.id, credential.handle)
                won = tx.move_grant(
                    grant.id,
                    ACTIVE,
                    if_handle=grant.handle,
                    handle=credential.handle,
                    window_end=isoformat(new_end),
                    duration=grant.duration + seconds,
                    credential_expires_at=isoformat(credential.expires_at),
                    due_at=_first_look(grant, new_end),
                    updated_at=self._now(),
                )
                if won:
                    self._log_decision(tx, principal, grant.id, decision, extension=seconds)
                    self._log(
                        tx,
                        Entry.EXTEND,
                        principal.actor(),
                        grant.id,
                        window_end_was=grant.window_end,
                        window_end=isoformat(new_end),
                        backend=chosen.backend,
                        **self._marks(backend, credential.handle),
                        replaces=self._fingerprint(grant.handle),
                        **credential.details,
                    )
                else:
                    self._log(
                        tx,
                        Entry.EXTEND_LOST,
                        principal.actor(),
                        grant.id,
                        backend=chosen.backend,
                        **self._marks(backend, credential.handle),
                        reason="the grant ended or changed while Vault issued the new credential",
                    )
        except Exception:
            backend.revoke(credential.handle)  # no record of it, so it must not exist
            raise
        if not won:
            # On the grant's list now, so the reaper removes it should this attempt fail.
            self._remove_unused(grant, backend, credential.handle)
            raise GrantConflict(f"grant {grant.id} ended while it was being extended")
        self._remove_replaced(grant, backend)
        self.on_change()
        return self._current(grant.id), credential

    def _claim_extension(self, grant: Grant) -> Credential:
        """Claim the right to replace the grant's credential before Vault is asked, conditional
        on the credential seen: of many extensions at once, one is issued and the others are
        refused before anything exists. The claim also keeps the reaper from writing `revoked`
        while the new credential is on its way (a release racing an extension)."""
        now = self.clock()
        claim = _credential_of(grant, "", isoformat(now), str(uuid.uuid4()), self.process_id)
        with self.store.transaction() as tx:
            current = self._current(grant.id, tx)
            if current.status != ACTIVE or current.handle != grant.handle:
                raise GrantConflict(
                    f"grant {grant.id} changed while the extension was checked "
                    f"(it is {current.status}): look at it again"
                )
            if any(self._in_flight(held, now) for held in tx.credentials_of(grant.id)):
                raise GrantConflict(
                    f"grant {grant.id} is being extended by another request: look at it again"
                )
            tx.add_credential(claim)
        return claim


def _task_record(grant: Grant, principal: Principal) -> dict | None:
    """What the chain records of a task: for which agent, which tools and scopes, who started it
    and on whose behalf (None when the agent started its own); None for any other grant."""
    task = grant.task
    if task is None:
        return None
    return {
        "agent": task.agent,
        "tools": task.tools_json(),
        "started_by": grant.task_started_by,
        "on_behalf_of": principal.actor() if grant.task_started_by == "person" else None,
    }


def _credential_of(
    grant: Grant, handle: str, at: str, credential_id: str = "", process: str = ""
) -> Credential:
    """A row of the grant's credential list (`handle` "" for an extension's claim, stamped with
    the `process` that makes it)."""
    return Credential(
        id=credential_id or str(uuid.uuid4()),
        grant_id=grant.id,
        backend=grant.backend,
        handle=handle,
        issued_at=at,
        issuing_process=process,
    )
