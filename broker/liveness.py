"""Which broker processes sharing one store are alive. Each process holds an exclusive lock on a
file of its own, beside the database, for as long as it runs; the kernel drops the lock when the
process dies, however it dies (SIGKILL included). So a starting broker knows at once that an
`issuing` grant was left by a dead process, rather than being in flight in a live one. A heartbeat
could not tell: a process killed a second ago still has a fresh one. Processes sharing a SQLite
file in WAL mode share one host (WAL needs shared memory), so they all see the same locks."""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from pathlib import Path
from typing import Protocol, TextIO

SUFFIX = ".lock"
_ID = re.compile(r"[0-9a-f]{32}")


class Liveness:
    """This process's claim to be alive, and the test of another's."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.id = uuid.uuid4().hex
        # Locked under a temporary name, then renamed: a file under its final name is always
        # locked while its process lives, so an unlocked one can only be a dead process's.
        claiming = self.directory / f"{self.id}.claiming"
        self._file = open(claiming, "w")  # noqa: SIM115 (held open and locked for the life of the process)
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        claiming.rename(self._path(self.id))
        self.forget_dead()

    @classmethod
    def beside(cls, database: Path) -> Liveness:
        database = Path(database)
        return cls(database.with_name(database.name + "-processes"))

    def is_alive(self, process_id: str) -> bool:
        """False only when the process is certainly gone: its lock is free, or its file is."""
        if process_id == self.id:
            return True
        if not _ID.fullmatch(process_id):
            return False  # not an id this module ever gave out
        try:
            fd = os.open(self._path(process_id), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it the probe's own lock
        return False

    def forget_dead(self) -> None:
        """Remove the files of dead processes (a missing file reads as dead, so this changes no
        answer); without it every restart would leave one behind."""
        for path in self.directory.glob(f"*{SUFFIX}"):
            if not self.is_alive(path.name.removesuffix(SUFFIX)):
                path.unlink(missing_ok=True)

    def _path(self, process_id: str) -> Path:
        return self.directory / f"{process_id}{SUFFIX}"


class Processes(Protocol):
    """What grants/ asks of liveness, whichever store keeps it (PostgreSQL keeps its own: its
    replicas need not share a host)."""

    @property
    def id(self) -> str: ...

    def is_alive(self, process_id: str) -> bool: ...


class FileLeadership:
    """One process of those sharing a SQLite file does a job (the audit forwarder): the one
    holding an exclusive lock on `path`. The kernel drops it when the holder dies, however it
    dies, and the next `holds()` of another process takes it over."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file: TextIO | None = None

    def holds(self) -> bool:
        if self._file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")  # noqa: SIM115 (kept open, and locked, while it leads)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        return True

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()
