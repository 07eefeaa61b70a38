"""Ending access: release, expiry, and the reaper's removal, which revokes and then verifies that
the credential is gone before anything says `revoked`; unverified removals are retried with
backoff and alerted on."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import NamedTuple

from .. import notify
from ..audit.events import Entry
from ..backends import Backend
from ..errors import (
    BrokerError,
    GrantConflict,
    GrantNotFound,
)
from ..models import (
    ACTIVE,
    APPROVED,
    EXPIRED,
    EXPIRED_UNAPPROVED,
    RELEASED,
    REVOKE_FAILED,
    REVOKED,
    REVOKING,
    TO_REAP,
    Credential,
    Grant,
    Principal,
    isoformat,
    parse_time,
)
from ..store import Transaction
from .base import (
    AWAITING,
    EXPIRY_WARNING,
    REAP_BATCH,
    REAPER,
    REVOCATION_LEASE,
    TAKEOVER_CHECK,
    GrantsBase,
    log,
)

_POOL_LOCK = threading.Lock()  # the reaper and a release waiting for its verdict may both start it

# How long a release that waits for the verdict waits on another reaper's claim of its grant.
WAIT_FOR_REMOVAL = 10.0
# What the revoke entry of a credential the bulk check found gone says instead of the answer.
ALREADY_GONE = "nothing to revoke: Vault had removed it already (its TTL ends at the window end)"
# Due grants of one kind from which one bulk look at Vault (`Backend.gone_among`) beats a
# lookup each.
BULK_MIN = 32


class Removing(GrantsBase):
    def _remove_replaced(self, grant: Grant, backend: Backend) -> None:
        """Revoke the credential an extension replaced. Should that fail, it stays on the grant's
        list for the reaper (and still dies at the old window end, inside the new window); the
        chain records what happened either way."""
        if not backend.revocable:
            with self.store.transaction() as tx:
                self._log(
                    tx,
                    Entry.REPLACED,
                    REAPER,
                    grant.id,
                    handle=self._fingerprint(grant.handle),
                    revocable=False,
                    valid_until=grant.window_end,
                )
            return
        self._remove_unused(grant, backend, grant.handle, replaced=True)

    def _remove_unused(
        self, grant: Grant, backend: Backend, handle: str, **context: object
    ) -> None:
        """Revoke and verify one credential of a live grant that nobody may use any more (the
        one an extension replaced, or the one an extension that lost a race made); it leaves
        the grant's list only once verified gone."""
        outcome = self._remove(backend, handle)
        with self.store.transaction() as tx:
            self._log_removal(tx, grant, backend, handle, outcome, **context)
            if outcome.gone:
                tx.mark_gone(grant.id, handle, self._now())

    def _remove(self, backend: Backend, handle: str) -> Removal:
        """Revoke, then verify even when the revoke call failed: Vault's own expiry may have
        removed it in the same instant, and what counts is whether the credential is gone, not
        who removed it."""
        return Removal(
            _failure_of(backend.revoke, handle),
            _failure_of(backend.is_gone, handle, want=True),
        )

    def _log_removal(
        self,
        tx: Transaction,
        grant: Grant,
        backend: Backend,
        handle: str,
        outcome: Removal,
        **context: object,
    ) -> None:
        for type_, data in self._removal_entries(backend, handle, outcome, **context):
            self._log(tx, type_, REAPER, grant.id, **data)

    def _removal_entries(
        self, backend: Backend, handle: str, outcome: Removal, **context: object
    ) -> list[tuple[Entry, dict]]:
        """The revoke and verify entries of one credential's removal (type, data)."""
        marks = self._marks(backend, handle)
        sent: dict[str, object] = (
            {"accepted": not outcome.revoke_error, "error": outcome.revoke_error or None}
            if outcome.sent
            else {"sent": False, "reason": ALREADY_GONE}
        )
        verified = {
            "gone": not outcome.verify_error,
            "method": outcome.method or backend.verify_method,
            "error": outcome.verify_error or None,
        }
        return [
            (Entry.REVOKE, {**marks, **sent, **context}),
            (Entry.VERIFY, {**marks, **verified, **context}),
        ]

    def release(self, principal: Principal, grant_id: str, wait: bool = False) -> Grant:
        """End the window now; the reaper, woken at once, removes and verifies. A credential
        nothing can revoke (its backend says `revocable = False`) stays valid until its own
        expiry: the release records the end, and the reaper looks (and verifies) only then.
        With `wait`, the caller's own thread removes and verifies it first, claimed exactly as
        the reaper claims (so no grant is removed twice), and gets the grant as that left it:
        `revoked`, or `revoke_failed` with the reaper retrying. The release and the claim are
        one transaction, the removal's record a second: two write transactions, not three. The
        grant is read inside the first, under the write lock, so what it says still holds."""
        now = self._now()
        claimed, handles = 0, []
        with self.store.transaction() as tx:
            grant = tx.get_grant(grant_id)
            if grant is None or not grant.owned_by(principal):
                raise GrantNotFound(f"no grant {grant_id} of yours")
            backend = self.backends.get(grant.backend)
            revocable = backend is None or backend.revocable
            due = now if revocable else max(now, grant.credential_expires_at or now)
            if grant.status != ACTIVE or not tx.move_grant(
                grant.id, ACTIVE, status=RELEASED, window_end=now, due_at=due, updated_at=now
            ):
                raise GrantConflict(f"grant {grant.id} is {grant.status}, not active")
            self._log(
                tx,
                Entry.RELEASE,
                principal.actor(),
                grant.id,
                window_end_was=grant.window_end,
                window_end=now,
                credential_valid_until=None if revocable else due,
            )
            # What this call did: the reaper, woken below, may move it on before anyone reads.
            released = replace(grant, status=RELEASED, window_end=now, due_at=due, updated_at=now)
            if wait and backend is not None and backend.revocable:
                # Claimed as the reaper claims (conditional on the attempt count), before the
                # commit: no reaper pass can take it between the release and the claim.
                attempt = released.attempts + 1
                if self._claim(tx, released, self.clock(), attempt):
                    claimed = attempt
                    handles = _live_handles(tx.credentials_of(grant.id))
        if not (wait and revocable):
            self.on_change()
            return released
        if not claimed or backend is None:  # no backend known: as the reaper would have it
            self._reap(released, self.clock())
            self.on_change()
            return self._settled(grant.id)
        outcomes = [(handle, self._remove(backend, handle)) for handle in handles]
        with self.store.transaction() as tx:
            failure = self._record(tx, released, claimed, backend, outcomes, self.clock())
            settled = self._current(grant.id, tx)
        if failure:
            self._alert_unverified(grant, claimed, *failure)
        if settled.status == REVOKED:
            self.on_record()  # nothing is due: only the new entries are news (the forwarder)
            return settled
        self.on_change()  # a retry is due (or another reaper took the claim over)
        return self._settled(grant.id)

    def _settled(self, grant_id: str) -> Grant:
        """The grant once its removal has a verdict (`revoked`, `revoke_failed`): when another
        reaper won the claim, its work is awaited, for at most WAIT_FOR_REMOVAL."""
        deadline = time.monotonic() + WAIT_FOR_REMOVAL
        while True:
            grant = self._current(grant_id)
            if grant.status not in (RELEASED, REVOKING) or time.monotonic() >= deadline:
                return grant
            time.sleep(0.005)

    def reap_due(self, now: datetime | None = None) -> datetime | None:
        """Remove every credential whose window has closed; return when the next one closes.
        Many closing together are first checked in bulk (`_check_in_bulk`); what that cannot
        prove gone, and everything else due, is shared out among `removal_workers` kept threads:
        each waits mostly on Vault, and each grant is claimed on its own (conditionally), so
        none is removed twice."""
        now = now or self.clock()
        while True:
            due = self.store.due_grants(isoformat(now), limit=REAP_BATCH)
            left = self._remove_in_bulk(due, now)
            workers = min(self.removal_workers, len(left))
            if workers > 1:
                chunks = [left[i::workers] for i in range(workers)]
                removals = [self._pool().submit(self._reap_all, c, now) for c in chunks]
                for removal in removals:
                    removal.result()  # the first failure, once all have finished
            else:
                self._reap_all(left, now)
            if len(due) < REAP_BATCH:
                break
        held_elsewhere = self._take_over_dead_claims(now)
        deadline = self.store.next_deadline()
        next_look = parse_time(deadline) if deadline else None
        if held_elsewhere:
            soon = now + TAKEOVER_CHECK
            next_look = soon if next_look is None else min(next_look, soon)
        return next_look

    def _remove_in_bulk(self, due: list[Grant], now: datetime) -> list[Grant]:
        """Grants whose windows have closed, at least BULK_MIN of one kind whose backend can
        answer for many at once, are checked in bulk; returns what is left for one at a time."""
        closed: dict[str, list[Grant]] = {}
        work: list[Grant] = []
        for grant in due:
            backend = self.backends.get(grant.backend)
            if backend is not None and backend.bulk_verify_method and _closed(grant, now):
                closed.setdefault(grant.backend, []).append(grant)
            else:
                work.append(grant)
        for kind, grants in closed.items():
            if len(grants) < BULK_MIN:
                work.extend(grants)
            else:
                work.extend(self._check_in_bulk(self.backends[kind], grants, now))
        return work

    def _check_in_bulk(self, backend: Backend, grants: list[Grant], now: datetime) -> list[Grant]:
        """Ask Vault once which of the grants' credentials are gone (`gone_among`), then claim
        and record, in one transaction, every grant whose credentials all are. Nothing is
        claimed while Vault is asked, so a broker killed meanwhile leaves nothing to take over.
        Returns the grants with a credential still there (or all, should the bulk call fail),
        to be claimed, revoked and verified one at a time."""
        held = self.store.credentials_of_many([grant.id for grant in grants])
        asked = {handle for listed in held.values() for handle in _live_handles(listed)}
        try:
            gone = backend.gone_among(asked) or set()
        except Exception as exc:  # noqa: BLE001 - each is then verified on its own
            log.warning("bulk check failed, %d grants verified alone: %s", len(grants), exc)
            return grants
        proven = [grant for grant in grants if _all_gone(held[grant.id], gone)]
        done = self._record_proven(backend, proven, gone) if proven else set()
        return [grant for grant in grants if grant.id not in done]

    def _record_proven(self, backend: Backend, proven: list[Grant], gone: set[str]) -> set[str]:
        """In one transaction, claim and record each grant the bulk check proved clean: one
        statement moves every grant still as it was read (status, attempt count: the fence the
        one-at-a-time claim uses) straight to `revoked`, counting the attempt; each moved gets
        the chain a one-at-a-time removal writes (expire, when its window was still `active`;
        per credential a revoke entry saying nothing needed revoking and a verify entry saying
        how it is known gone). Its credentials are read again under the write lock: only those
        asked about can Vault's answer prove gone, so a grant holding another now (a racing
        extension's) is left to the one-at-a-time way. Returns the ids it is done with: recorded,
        or moved by another reaper first (its removal is that one's)."""
        proof = Removal("", "", sent=False, method=backend.bulk_verify_method)
        with self.store.transaction() as tx:
            at = self._now()
            held = tx.credentials_of_many([grant.id for grant in proven])
            clean = [grant for grant in proven if _all_gone(held[grant.id], gone)]
            moved = tx.move_grants(
                [(g.id, g.status, g.attempts, g.window_end) for g in clean],
                count_attempt=True,
                status=REVOKED,
                due_at="",
                last_error="",
                issuing_process=self.process_id,
                updated_at=at,
            )
            entries: list[tuple[str, str, dict, str | None, dict]] = []
            removed: list[str] = []
            for grant in (g for g in clean if g.id in moved):
                if grant.status == ACTIVE:
                    window = {"window_end": grant.window_end}
                    entries.append((at, Entry.EXPIRE, REAPER, grant.id, window))
                for credential in held[grant.id]:
                    if credential.gone_at:
                        continue
                    removal = self._removal_entries(
                        backend, credential.handle, proof, attempt=grant.attempts + 1
                    )
                    entries += [(at, type_, REAPER, grant.id, data) for type_, data in removal]
                    removed.append(credential.id)
                tx.after_commit(partial(self._count_revoked, grant))
            tx.append_many(entries)
            tx.mark_gone_many(removed, at)
        return {grant.id for grant in clean}

    def _pool(self) -> ThreadPoolExecutor:
        """The reaper's removal threads, made once and kept: a pool made for every pass left a
        store connection behind for each thread it ever ran (memory that never came back)."""
        with _POOL_LOCK:
            if self._removal_pool is None:
                self._removal_pool = ThreadPoolExecutor(
                    self.removal_workers, thread_name_prefix="reaper-pool"
                )
            return self._removal_pool

    def close_removal_pool(self) -> None:
        """Let the removal threads end (the reaper has stopped); a later pass makes new ones."""
        with _POOL_LOCK:
            pool, self._removal_pool = self._removal_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _take_over_dead_claims(self, now: datetime) -> bool:
        """Removals claimed by a broker process that has died since (kill -9 mid-revocation) are
        taken over now rather than when their lease lapses. True while another live process holds
        claims: the reaper looks again within TAKEOVER_CHECK, in case that one dies too."""
        if self.processes is None:
            return False
        held_elsewhere, dead = False, {}
        for grant in self.store.grants_in((REVOKING,)):
            claimer = grant.issuing_process
            if not claimer or claimer == self.process_id:
                continue  # a claim from before processes were stamped, or this process's own
            if claimer not in dead:  # asked once per process and pass
                dead[claimer] = self._dead(claimer)
            if dead[claimer]:
                self._reap(grant, now)
            else:
                held_elsewhere = True
        return held_elsewhere

    def _reap(self, grant: Grant, now: datetime) -> None:
        self._reap_all([grant], now)

    def _reap_all(self, grants: list[Grant], now: datetime) -> None:
        """Look at each grant in turn: expire a stale request, warn of a window closing soon, or
        remove what a closed window held."""
        for grant in grants:
            if grant.status in AWAITING:
                self._expire_unapproved(grant)
            elif grant.status == ACTIVE and parse_time(grant.window_end) > now:
                self._warn_of_expiry(grant, now)
            else:
                self._remove_closed(grant, now)

    def _remove_closed(self, grant: Grant, now: datetime) -> None:
        """Claim one grant (conditionally), revoke and verify what it holds, record it behind the
        fence. One grant at a time: a claim is held only while its own removal runs."""
        attempt = grant.attempts + 1
        with self.store.transaction() as tx:
            if not self._claim(tx, grant, now, attempt):
                return
        backend = self.backends[grant.backend]
        outcomes = [
            (handle, self._remove(backend, handle))
            for handle in _live_handles(self.store.credentials_of(grant.id))
        ]
        with self.store.transaction() as tx:
            failure = self._record(tx, grant, attempt, backend, outcomes, now)
        if failure:
            self._alert_unverified(grant, attempt, *failure)

    def _alert_unverified(self, grant: Grant, attempt: int, error: str, retry_at: str) -> None:
        """Tell security that a removal could not be verified, and when it is tried again."""
        log.warning("grant %s: removal not verified (attempt %d): %s", grant.id, attempt, error)
        self.notify(
            "revoke_failed",
            f"Removal of {grant.entitlement} for {grant.requester} could "
            f"not be verified (attempt {attempt}): {error}. Retrying at {retry_at}.",
            grant_id=grant.id,
            audience="security",
        )

    def _record(
        self,
        tx: Transaction,
        grant: Grant,
        attempt: int,
        backend: Backend,
        outcomes: list[tuple[str, Removal]],
        now: datetime,
    ) -> tuple[str, str] | None:
        """Write one grant's removal: `revoked` only when every credential is verified gone;
        otherwise a retry with backoff. Returns (error, retry_at) for a failure to alert on."""
        # The fence: still this attempt's claim? A reaper paused past REVOCATION_LEASE
        # (GC, SIGSTOP, a network stall) may find another has claimed the grant since; it
        # records nothing over that one's work (what it revoked meanwhile stays revoked).
        if not tx.move_grant(grant.id, REVOKING, if_attempts=attempt, attempts=attempt):
            log.warning("grant %s: claim %d was taken over, nothing recorded", grant.id, attempt)
            return None
        for handle, outcome in outcomes:
            self._log_removal(tx, grant, backend, handle, outcome, attempt=attempt)
            if outcome.gone:
                tx.mark_gone(grant.id, handle, self._now())
        # Read again under the write lock: a racing extension may have added one meanwhile.
        left = [
            held
            for held in tx.credentials_of(grant.id)
            if not held.gone_at and (held.handle or self._in_flight(held, self.clock()))
        ]
        if not left:
            if tx.move_grant(
                grant.id,
                REVOKING,
                status=REVOKED,
                due_at="",
                last_error="",
                updated_at=self._now(),
            ):
                tx.after_commit(lambda: self._count_revoked(grant))
            return None
        error = "; ".join(dict.fromkeys(o.error for _, o in outcomes if not o.gone))
        if not error:
            # Only what a racing extension is issuing (or has just added) is left: not a
            # failure, so no alert; look again soon.
            tx.move_grant(
                grant.id,
                REVOKING,
                due_at=isoformat(now + timedelta(seconds=self.retry_min)),
                updated_at=self._now(),
            )
            return None
        backoff = min(self.retry_max, self.retry_min * 2 ** (attempt - 1))
        retry_at = isoformat(now + timedelta(seconds=backoff))
        tx.move_grant(
            grant.id,
            REVOKING,
            status=REVOKE_FAILED,
            last_error=error,
            due_at=retry_at,
            updated_at=self._now(),
        )
        self._log(
            tx,
            Entry.REVOKE_FAILED,
            REAPER,
            grant.id,
            attempt=attempt,
            error=error,
            next_attempt_at=retry_at,
        )
        tx.after_commit(self.metrics.revoke_failures.labels(grant.backend).inc)
        return error, retry_at

    def _count_revoked(self, grant: Grant) -> None:
        self.metrics.revoked.labels(grant.backend).inc()
        if grant.window_end:  # the window's end, or the release (which moves it to now)
            lag = (self.clock() - parse_time(grant.window_end)).total_seconds()
            self.metrics.revocation_lag.labels(grant.backend).observe(max(lag, 0.0))

    def _claim(self, tx: Transaction, grant: Grant, now: datetime, attempt: int) -> bool:
        """Move the grant to revoking; False when someone else moved it first. Conditional on
        the attempt count read with the grant: a grant already `revoking` is in TO_REAP too (a
        lapsed claim is taken over), so the status alone would let two reapers that read it
        before either claimed both claim it. The count is the claim's fencing token."""
        if grant.status == ACTIVE:
            if not tx.move_grant(grant.id, ACTIVE, status=EXPIRED, updated_at=self._now()):
                return False
            self._log(tx, Entry.EXPIRE, REAPER, grant.id, window_end=grant.window_end)
        return tx.move_grant(
            grant.id,
            TO_REAP,
            if_attempts=grant.attempts,
            status=REVOKING,
            issuing_process=self.process_id,  # the claim's holder, while it is `revoking`
            attempts=attempt,
            due_at=isoformat(now + REVOCATION_LEASE),
            updated_at=self._now(),
        )

    def _warn_of_expiry(self, grant: Grant, now: datetime) -> None:
        """Tell the requester the window closes soon; then look again at the window end."""
        with self.store.transaction() as tx:
            if not tx.move_grant(grant.id, ACTIVE, due_at=grant.window_end):
                return
        minutes = max(1, round((parse_time(grant.window_end) - now).total_seconds() / 60))
        self.notify(
            notify.EXPIRING,
            notify.expiring_text(grant, minutes),
            grant_id=grant.id,
            audience="requester",
        )

    def _expire_unapproved(self, grant: Grant) -> None:
        with self.store.transaction() as tx:
            if not tx.move_grant(
                grant.id, grant.status, status=EXPIRED_UNAPPROVED, due_at="", updated_at=self._now()
            ):
                return
            self._log(
                tx,
                Entry.EXPIRE_UNAPPROVED,
                REAPER,
                grant.id,
                was=grant.status,
                waited_until=grant.due_at,
            )
        self.notify(
            "expired_unapproved",
            f"Your request for {grant.entitlement} expired "
            f"before it was {'activated' if grant.status == APPROVED else 'approved'}.",
            grant_id=grant.id,
            audience="requester",
        )


def _closed(grant: Grant, now: datetime) -> bool:
    """Whether the reaper would remove what the grant holds now (its window has closed)."""
    if grant.status == ACTIVE:
        return parse_time(grant.window_end) <= now
    return grant.status in TO_REAP


def _live_handles(held: list[Credential]) -> list[str]:
    """The handles of the credentials not yet verified gone (one without a handle, an
    extension still being issued, has nothing to revoke yet)."""
    return [c.handle for c in held if c.handle and not c.gone_at]


def _all_gone(held: list[Credential], gone: set[str]) -> bool:
    """Whether every credential not yet verified gone is among `gone`. One with no handle yet
    (an extension being issued) is not: it goes the one-at-a-time way, which waits for it."""
    return all(c.gone_at or (c.handle and c.handle in gone) for c in held)


class Removal(NamedTuple):
    """What went wrong revoking a credential and verifying it gone ("" for nothing); `sent`
    False when nothing needed revoking (Vault had removed it), `method` how it was proven gone
    when not the backend's `verify_method`."""

    revoke_error: str
    verify_error: str
    sent: bool = True
    method: str = ""

    @property
    def gone(self) -> bool:
        return not self.verify_error

    @property
    def error(self) -> str:
        return "; ".join(dict.fromkeys(e for e in (self.revoke_error, self.verify_error) if e))


def _failure_of(step: Callable, handle: str, want: object = None) -> str:
    """Run one removal step; return what went wrong ("" when it did what was wanted), so the
    reaper records it and retries rather than dying on one grant's surprise."""
    try:
        result = step(handle)
    except BrokerError as exc:
        return exc.detail
    except Exception as exc:
        log.exception("removal step %s failed", getattr(step, "__name__", step))
        return f"{type(exc).__name__}: {exc}"
    if want is not None and result != want:
        return "Vault still knows the credential after revocation"
    return ""


def _first_look(grant: Grant, end: datetime | None = None) -> str:
    """An active grant is looked at first to warn its requester, if the window is long enough."""
    end = end or parse_time(grant.window_end)
    if end - parse_time(grant.window_start) > 2 * EXPIRY_WARNING:
        return isoformat(end - EXPIRY_WARNING)
    return isoformat(end)
