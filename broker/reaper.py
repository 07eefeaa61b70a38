"""The background thread that ends grants on time. It sleeps until the next deadline or until woken
by a new grant or a release; the work itself is `Grants.reap_due`, which tests call directly."""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from .grants import Grants
from .models import utcnow

log = logging.getLogger(__name__)

ERROR_PAUSE = 5.0  # seconds before trying again after the store itself failed


class Reaper:
    def __init__(self, grants: Grants):
        self.grants = grants
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_run: datetime | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jit-reaper", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping:
            # Clear before reaping: a wake that lands during reap_due is kept for the wait below.
            self._wake.clear()
            try:
                deadline = self.grants.reap_due()
                pause = None if deadline is None else (deadline - utcnow()).total_seconds()
            except Exception:
                log.exception("reaper pass failed; trying again in %ss", ERROR_PAUSE)
                pause = ERROR_PAUSE
            self.last_run = utcnow()
            if not self._stopping:
                self._wake.wait(None if pause is None else max(0.0, pause))
