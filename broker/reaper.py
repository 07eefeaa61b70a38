"""The background thread that ends grants on time. It sleeps until the next deadline or the next
heartbeat, or until woken by a new grant or a release; the work itself is `Grants.reap_due`, which
tests call directly. Reconciliation (`Grants.reconcile`: a sweep of everything Vault holds for the
broker, seconds long with thousands of tokens) runs in a thread of its own, so no window waits
for it to end. It also signs the audit log's
checkpoints, at intervals and once more when it stops, and renews the broker's own Vault token
(`OwnToken.renew_if_due`, also called directly by tests) when half its TTL is gone. Each completed
pass is a heartbeat: when the heartbeats stop, the broker stops issuing (`Grants.health`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from .grants import Grants
from .models import utcnow

log = logging.getLogger(__name__)

ERROR_PAUSE = 5.0  # seconds before trying again after the store itself failed


class Reaper:
    def __init__(
        self,
        grants: Grants,
        heartbeat: float = 30,
        reconcile_every: float = 300,
        checkpoint: Callable[[], object] = lambda: None,
        checkpoint_every: float = 60,
        renew_token: Callable[[], float | None] = lambda: None,
    ):
        self.grants = grants
        self.heartbeat_every = heartbeat
        self.reconcile_every = reconcile_every
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self._next_checkpoint = 0.0
        self.renew_token = renew_token  # seconds until it is next due, or None
        self._wake = threading.Event()
        self._stopped = threading.Event()  # ends the reconciler's wait at once
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._reconciler: threading.Thread | None = None
        self.last_run: datetime | None = None  # the last pass that completed: the heartbeat
        self.last_reconcile: datetime | None = None  # the last sweep that completed
        self._started_at: datetime | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._stopped.clear()
            self._started_at = utcnow()
            self._thread = threading.Thread(target=self._run, name="jit-reaper", daemon=True)
            self._thread.start()
            # At once on start (whatever a crash left behind), then every reconcile_every.
            self._reconciler = threading.Thread(
                target=self._reconcile_loop, name="jit-reconcile", daemon=True
            )
            self._reconciler.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10) -> None:
        """Stop the thread, then sign a last checkpoint over everything written until now."""
        self._stopping = True
        self._wake.set()
        self._stopped.set()
        for thread in (self._thread, self._reconciler):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._reconciler = None
        self.grants.close_removal_pool()
        self._checkpoint()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def heartbeat(self) -> datetime | None:
        """When the reaper last completed a pass (its start, before the first); None when it is
        not running."""
        if not self.running:
            return None
        return self.last_run or self._started_at

    def _run(self) -> None:
        while not self._stopping:
            # Clear before reaping: a wake that lands during reap_due is kept for the wait below.
            self._wake.clear()
            pause = min(self._reap(), self._renew_token())
            if time.monotonic() >= self._next_checkpoint:
                self._next_checkpoint = time.monotonic() + self.checkpoint_every
                self._checkpoint()
            if not self._stopping:
                until = self._next_checkpoint - time.monotonic()
                self._wake.wait(max(0.0, min(pause, until, self.heartbeat_every)))

    def _reconcile_loop(self) -> None:
        while not self._stopping:
            self._reconcile()
            self._stopped.wait(self.reconcile_every)

    def _checkpoint(self) -> None:
        try:
            self.checkpoint()
        except Exception:
            log.exception("signing an audit checkpoint failed; trying again at the next one")

    def _reconcile(self) -> None:
        """A failed sweep (Vault down) is logged and tried again at the next one."""
        try:
            self.grants.reconcile()
        except Exception:
            log.exception("reconciliation failed; trying again in %ss", self.reconcile_every)
            return
        self.last_reconcile = utcnow()

    def _renew_token(self) -> float:
        """The broker's own Vault token; a failure is reported on /readyz and tried again."""
        try:
            due = self.renew_token()
        except Exception:
            log.exception("renewing the broker's Vault token failed; again in %ss", ERROR_PAUSE)
            return ERROR_PAUSE
        return self.heartbeat_every if due is None else due

    def _reap(self) -> float:
        """One pass; returns the seconds until the next deadline. Only a completed pass beats."""
        try:
            deadline = self.grants.reap_due()
            # By the clock that decides what is due (the database's, on PostgreSQL): a replica
            # whose own clock runs ahead would otherwise wake early and spin until it caught up.
            pause = None if deadline is None else (deadline - self.grants.clock()).total_seconds()
        except Exception:
            log.exception("reaper pass failed; trying again in %ss", ERROR_PAUSE)
            return ERROR_PAUSE
        self.last_run = utcnow()
        return self.heartbeat_every if pause is None else pause
