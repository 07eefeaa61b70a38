"""The policy as the broker uses it: the file on disk, reloaded when it changes. A broken edit is
refused, logged, and the last good policy stays in force; the broker never runs without one."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError
from .decide import Policy
from .kinds import KindReader
from .parse import load_policy

log = logging.getLogger(__name__)


class PolicyFile:
    def __init__(self, path: Path, kinds: Iterable[KindReader]):
        self.path = Path(path)
        self.kinds = tuple(kinds)
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._policy = load_policy(self.path, self.kinds)  # at start, a broken file is fatal
        self.last_error = ""

    def current(self) -> Policy:
        """The policy in force; reads the file again only when its stamp changed."""
        stamp = self._stamp()
        if stamp != self._seen:
            with self._lock:
                if stamp != self._seen:
                    self._reload(stamp)
        return self._policy

    def _reload(self, stamp: tuple) -> None:
        self._seen = stamp
        try:
            policy = load_policy(self.path, self.kinds)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error(
                "policy change refused, keeping version %s: %s", self._policy.version[:12], exc
            )
            return
        if policy.version != self._policy.version:
            log.info(
                "policy reloaded: version %s -> %s", self._policy.version[:12], policy.version[:12]
            )
        self._policy, self.last_error = policy, ""

    def _stamp(self) -> tuple:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return ("missing",)
        return (status.st_mtime_ns, status.st_size, status.st_ino)
