"""The user's own files: the default broker, and per broker the login and the credentials of
grants, under the user's config directory (platformdirs). Every file is written whole (a temporary
file renamed over it) with mode 0600 in directories of mode 0700, and a file that others could
read or write, or that someone else owns, is refused by name rather than used."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from .errors import ClientError, UnsafeStateFile

APP_NAME = "jit"


def default_root() -> Path:
    """The user's config directory for jit (~/.config/jit on Linux; XDG_CONFIG_HOME moves it)."""
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


class StateDir:
    """JSON files under one private directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, relative: str) -> Path:
        return self.root / relative

    def read(self, relative: str) -> dict | None:
        """The file's object, or None when there is none. Refuses an unsafe file."""
        path = self.path(relative)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            _check_private(path, os.fstat(file.fileno()))
            raw = file.read()
        try:
            data = json.loads(raw)
        except ValueError:
            raise ClientError(f"{path} is not valid JSON; remove it and log in again") from None
        if not isinstance(data, dict):
            raise ClientError(f"{path} is not a JSON object; remove it and log in again")
        return data

    def write(self, relative: str, data: dict) -> Path:
        """Write the file whole, readable by the user only."""
        path = self.path(relative)
        _private_directory(path.parent, self.root)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file, indent=2, sort_keys=True)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def remove(self, relative: str) -> bool:
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            return False
        return True

    @contextmanager
    def lock(self, relative: str) -> Iterator[None]:
        """An exclusive lock between jit processes, on a file that is never replaced."""
        path = self.path(relative)
        _private_directory(path.parent, self.root)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def names(self, relative: str) -> list[str]:
        """The JSON files' names (without .json) in a subdirectory."""
        folder = self.path(relative)
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.json"))


def _check_private(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeStateFile(f"{path} is not a regular file; remove it and log in again")
    if info.st_uid != os.geteuid():
        raise UnsafeStateFile(f"{path} belongs to another user; remove it and log in again")
    if info.st_mode & 0o077:
        mode = oct(stat.S_IMODE(info.st_mode))[2:]
        raise UnsafeStateFile(
            f"{path} may be read or changed by others (mode {mode}); it holds secrets, so jit "
            f"will not use it: run `chmod 600 {path}` if nobody else could have read it, or "
            "remove it and log in again"
        )


def _private_directory(folder: Path, root: Path) -> None:
    """Make `root` and the directories below it down to `folder` with mode 0700 (the parents of
    `root`, such as ~/.config, as the system makes them)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    here = root
    here.mkdir(mode=0o700, exist_ok=True)
    for part in folder.relative_to(root).parts:
        here = here / part
        here.mkdir(mode=0o700, exist_ok=True)


def broker_key(url: str) -> str:
    """A file-system name for a broker URL: its host and port, and a short hash of the whole URL
    (two brokers on one host under different paths stay apart)."""
    parts = urlsplit(url)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", parts.netloc) or "broker"
    return f"{host}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
