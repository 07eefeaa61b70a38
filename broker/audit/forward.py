"""Forwarding the audit log to an HTTP endpoint (a SIEM, a log store), every entry, in order, at
least once. One background thread posts the entries after a saved cursor in batches,
`{"entries": [...]}`, each entry exactly as stored (seq, at, type, actor, grant_id, data, prev,
hash), and moves the cursor only after a 2xx. The signed checkpoints go the same way, each in
the first body whose entries reach its size (`"checkpoints": [...]`): the SIEM is a witness the
broker's host cannot rewrite (`jit audit verify --witness`). Only one batch is ever in flight,
so the receiver sees entries in seq order. A crash (or a failed cursor write) after a delivery
but before the cursor is saved sends that batch again: receivers dedupe by seq.

Forwarding never holds up the broker: the log in the store is the source of truth, and an outage
only makes the forwarder fall behind (its lag is on /readyz) and retry with backoff."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import requests

from ..models import isoformat, utcnow
from ..urls import loggable_target
from .storage import AuditStore

log = logging.getLogger(__name__)

CURSOR = "forward"  # the name of the forwarder's position in the store's cursors table
CHECKPOINT_CURSOR = "forward-checkpoints"  # the largest checkpoint size delivered
POLL_EVERY = 5.0  # seconds between looks at the log when nobody wakes the forwarder
BACKOFF_MIN = 1.0  # seconds before retrying a failed batch; doubles per failure ...
BACKOFF_MAX = 60.0  # ... up to this


class ForwardFailed(Exception):
    """One batch was not delivered (or its delivery not recorded); the cursor has not moved."""


class Forwarder:
    def __init__(
        self,
        store: AuditStore,
        url: str | None,
        token: str = "",
        timeout: float = 5,
        batch: int = 100,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        poll_every: float = POLL_EVERY,
        post: Callable[..., requests.Response] | None = None,
        lead: Callable[[], bool] = lambda: True,
        resign: Callable[[], None] = lambda: None,
    ):
        self.store = store
        # Whether this process is the one that forwards (store.leadership): the cursor is shared,
        # so forwarders of several processes at once would send entries twice.
        self.lead, self.resign = lead, resign
        self.leading = False
        self.url = url or ""
        # Scheme and host only: the one part of the URL that may be logged (a path can be secret).
        self.target = loggable_target(self.url, "audit.forward_url") if self.url else ""
        self.token = token
        self.timeout = timeout
        self.batch = max(1, int(batch))
        self.backoff_min = backoff_min
        self.backoff_max = max(backoff_min, backoff_max)
        self.poll_every = poll_every
        # Called as post(url, json=..., headers=..., timeout=..., allow_redirects=False).
        self._post = post
        self.delivered = 0  # entries accepted by the receiver (a resent batch counts again)
        self.last_success: datetime | None = None
        self.last_error = ""
        self.last_error_at: datetime | None = None
        self.failures = 0  # consecutive failed attempts; 0 while delivering
        self.retry_in = 0.0  # the backoff before the next attempt, while failing
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.enabled and self._thread is None:
            if self._post is None:
                self._post = requests.Session().post
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jit-forward", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """New entries were written: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread; what is not yet delivered is sent by the next start, from the cursor.
        Waits at most one request's timeout for a batch in flight."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.timeout + 1 if timeout is None else timeout)
        self.resign()  # another process (or a later start) forwards from here
        self.leading = False

    def forward_once(self) -> int:
        """Deliver the next batch after the cursor and save the cursor; the number of entries
        delivered (0: nothing to send). Raises ForwardFailed with the reason, cursor unmoved."""
        if self._post is None:
            self._post = requests.Session().post
        self.leading = self.lead()
        if not self.leading:
            return 0  # another process forwards; this one takes over if that one dies
        try:
            cursor = self.store.cursor(CURSOR)
            entries = list(self.store.audit_entries(after=cursor, limit=self.batch))
            reach = entries[-1]["seq"] if entries else cursor
            signed_cursor = self.store.cursor(CHECKPOINT_CURSOR)
            checkpoints = [
                c
                for c in self.store.checkpoints(first=signed_cursor + 1, last=reach)
                if c["size"] > signed_cursor
            ]
        except Exception as exc:
            raise ForwardFailed(f"reading the audit log failed: {type(exc).__name__}") from None
        if not entries and not checkpoints:
            return 0
        try:
            # The receiver must never hold an entry that a power loss could take back here:
            # the chain would then fork at that seq.
            self.store.make_durable()
        except Exception as exc:
            raise ForwardFailed(f"syncing the audit log failed: {type(exc).__name__}") from None
        failure = self._send(self._post, entries, checkpoints)
        if failure:
            raise ForwardFailed(failure)
        try:
            if checkpoints:
                self.store.set_cursor(CHECKPOINT_CURSOR, checkpoints[-1]["size"])
            if entries:
                self.store.set_cursor(CURSOR, reach)
        except Exception as exc:
            # Delivered but not recorded: the same batch goes again, which receivers dedupe.
            raise ForwardFailed(
                f"seq {cursor + 1}-{reach} delivered but saving the cursor failed: "
                f"{type(exc).__name__}"
            ) from None
        self.delivered += len(entries)
        self.last_success = utcnow()
        return len(entries)

    def health(self) -> dict:
        """For /readyz, informational only: an outage never stops issuing (the log in the
        store is the record); `lag` says how far the receiver is behind."""
        if not self.enabled:
            return {"ok": True, "enabled": False}
        check: dict = {"ok": self.failures == 0, "enabled": True, "running": self.running}
        try:
            cursor = self.store.cursor(CURSOR)
            head = self.store.audit_head()
        except Exception as exc:
            check.update(ok=False, error=f"reading the audit log failed: {type(exc).__name__}")
            return check
        head_seq = head["seq"] if head else 0
        check.update(
            cursor=cursor,
            head=head_seq,
            lag=max(0, head_seq - cursor),
            delivered=self.delivered,
            last_success=isoformat(self.last_success) if self.last_success else None,
            last_error=self.last_error or None,
            last_error_at=isoformat(self.last_error_at) if self.last_error_at else None,
            failures=self.failures,
            leading=self.leading,  # False: another process of this store forwards
        )
        if self.failures:
            check["retry_in"] = self.retry_in
        if not self.running:
            check.update(ok=False, error="the audit forwarder is not running")
        return check

    def _run(self) -> None:
        delay = self.backoff_min
        while not self._stop.is_set():
            # Clear before looking: a wake that lands during a delivery is kept for the wait.
            self._wake.clear()
            try:
                sent = self.forward_once()
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ForwardFailed) else type(exc).__name__
                if not isinstance(exc, ForwardFailed):
                    log.exception("audit forwarding failed unexpectedly")
                self._failed(reason, delay)
                self._stop.wait(delay)  # a wake does not cut the backoff short; a stop does
                delay = min(delay * 2, self.backoff_max)
                continue
            if self.failures:
                log.info(
                    "audit forwarding to %s delivers again after %d failed attempt(s)",
                    self.target,
                    self.failures,
                )
            self.failures = 0
            self.retry_in = 0.0
            delay = self.backoff_min
            if sent < self.batch:  # caught up; a full batch means more may be waiting
                self._wake.wait(self.poll_every)

    def _failed(self, reason: str, delay: float) -> None:
        self.failures += 1
        self.last_error = reason
        self.last_error_at = utcnow()
        self.retry_in = delay
        log.warning(
            "audit forwarding to %s failed (%s); cursor kept, retrying the batch in %ss",
            self.target,
            reason,
            delay,
        )

    def _send(
        self, post: Callable[..., requests.Response], entries: list[dict], checkpoints: list[dict]
    ) -> str:
        """One POST; "" when the receiver answered 2xx, else why not. Never the exception's text
        (requests puts the URL in it), never the token."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = post(
                self.url,
                json={"entries": entries, **({"checkpoints": checkpoints} if checkpoints else {})},
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            )
        except Exception as exc:
            return type(exc).__name__
        if 200 <= response.status_code < 300:
            return ""
        return f"HTTP {response.status_code}"
