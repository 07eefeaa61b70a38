"""The dashboard's figures as one process keeps them: counted on one background thread, when the
broker starts and again once they are older than a minute, so that no page load ever waits for a
count (over a busy fortnight it reads a million entries and takes seconds). Never counts on the
caller's thread; no Flask."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from time import monotonic
from typing import NamedTuple

from ..errors import StoreUnavailable
from ..models import isoformat, utcnow
from .dashboard import Figures

log = logging.getLogger(__name__)

# Seconds the dashboard's figures are shown before they are counted again (in the background).
FRESH = 60.0


@dataclass(frozen=True)
class FailedCount:
    """The last count failed: when, and why in words an auditor can act on (never the exception's
    own text, which is for the broker's log)."""

    at: str
    reason: str


class Shown(NamedTuple):
    """What a dashboard page shows, read together."""

    figures: Figures | None  # None: the first count has not finished
    failed: FailedCount | None  # the last count's failure, until one succeeds


def failure_of(exc: Exception) -> FailedCount:
    if isinstance(exc, StoreUnavailable):
        reason = "the broker's store could not be read"
    else:
        reason = "an unexpected error (the broker's log has the details)"
    return FailedCount(isoformat(utcnow()), reason)


class KeptFigures:
    """The last figures counted, handed out at once: `None` until the first count has finished.
    A count runs on this process's one kept thread, started by `start()` (the broker's services
    start) and by any `get()` or `shown()` that finds no figures, or figures older than `fresh`
    seconds, and no count running. A failed count is kept (`failed()`) until one succeeds; the
    next `get()` tries again. `close()` ends the thread."""

    def __init__(self, count: Callable[[datetime], Figures], fresh: float = FRESH) -> None:
        self._count = count
        self._fresh = fresh
        self._lock = threading.Lock()  # guards everything below
        self._kept: Figures | None = None
        self._kept_at = 0.0  # monotonic() at the count
        self._failed: FailedCount | None = None
        self._counting = False
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None  # one kept thread: one store connection

    def start(self) -> None:
        """Count now, in the background: the first page after a start finds the count under way,
        or done."""
        with self._lock:
            self._count_in_background()

    def get(self) -> Figures | None:
        """The kept figures (`None` before the first count has finished), at once; starts a count
        in the background when they are missing or stale and none runs."""
        return self.shown().figures

    def shown(self) -> Shown:
        """What a page shows, read at once and together: the kept figures and the last failure
        (starting a count as `get()` does)."""
        with self._lock:
            kept = self._kept
            if kept is None or monotonic() - self._kept_at >= self._fresh:
                self._count_in_background()
            return Shown(kept, self._failed)

    def failed(self) -> FailedCount | None:
        """Why the last count failed, until a count succeeds."""
        with self._lock:
            return self._failed

    def close(self) -> None:
        """Let the background thread end after the count in hand (the broker stops); no count
        starts afterwards."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _count_in_background(self) -> None:
        """Under the lock: one count at a time, none once closed."""
        if self._counting or self._closed:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="jit-dashboard")
        self._counting = True
        self._pool.submit(self._count_once)

    def _count_once(self) -> None:
        figures: Figures | None = None
        failed: FailedCount | None = None
        try:
            figures = self._count(utcnow())
        except Exception as exc:  # noqa: BLE001 - the page says so; the next load tries again
            log.exception("counting the dashboard's figures failed; tried again at the next load")
            failed = failure_of(exc)
        finally:
            with self._lock:  # with the end of the count: a load seeing it sees it over
                if figures is not None:
                    self._kept, self._kept_at, self._failed = figures, monotonic(), None
                elif failed is not None:
                    self._failed = failed
                self._counting = False
