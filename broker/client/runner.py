"""Running the user's command with a credential for as long as its window lasts: signals sent to
jit go on to the command, a warning comes a minute before the window ends, and at the end the
command gets SIGTERM, then SIGKILL after a grace period. Its exit status is jit's (128 + the
signal, as a shell says, when a signal ended it)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import ClientError

# What a terminal or a supervisor sends that the command should get too.
FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
WARN_BEFORE = timedelta(minutes=1)
GRACE = 5.0  # seconds between SIGTERM and SIGKILL at the window end
COMMAND_NOT_FOUND = 127  # as a shell says
COMMAND_NOT_RUNNABLE = 126


class CommandNotFound(ClientError):
    exit_code = COMMAND_NOT_FOUND


class CommandNotRunnable(ClientError):
    exit_code = COMMAND_NOT_RUNNABLE


@dataclass
class Outcome:
    status: int  # the command's exit status (128 + N when signal N ended it)
    stopped_at_window_end: bool


def run_in_window(
    argv: list[str],
    env: dict[str, str],
    window_end: datetime,
    say: Callable[[str], None],
    grace: float = GRACE,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Outcome:
    """Run `argv` until it exits or the window ends."""
    # The handlers go in before the command starts: a signal in between is held, then sent on,
    # so jit never dies of it and leaves the command running.
    children: list[subprocess.Popen] = []
    held: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        if children:
            _forward(children[0], sig)
        else:
            held.append(sig)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        children.append(_start(argv, env))
    except BaseException:
        _restore(previous)
        raise
    child = children[0]
    for sig in held:
        _forward(child, sig)
    warned = stopped = False
    try:
        while True:
            left = (window_end - now()).total_seconds()
            if not warned and left <= WARN_BEFORE.total_seconds() and left > 0:
                say(f"the window ends in {int(left)} s; the command will be stopped then")
                warned = True
            if left <= 0 and not stopped:
                say("the window has ended: stopping the command (SIGTERM)")
                _forward(child, signal.SIGTERM)
                stopped = True
                try:
                    child.wait(grace)
                except subprocess.TimeoutExpired:
                    say(f"the command did not stop within {grace:g} s: SIGKILL")
                    child.kill()
                    child.wait()
            if child.poll() is not None:
                break
            step = left - WARN_BEFORE.total_seconds() if not warned else left
            try:
                child.wait(timeout=max(0.05, min(step, 1.0)))
            except subprocess.TimeoutExpired:
                pass
    finally:
        _restore(previous)
    code = child.returncode
    return Outcome(128 - code if code < 0 else code, stopped)


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(argv, env=env)  # noqa: S603 (the user's own command)
    except FileNotFoundError:
        raise CommandNotFound(f"{argv[0]}: command not found") from None
    except PermissionError:
        raise CommandNotRunnable(f"{argv[0]}: permission denied") from None
    except OSError as exc:
        raise CommandNotRunnable(f"{argv[0]}: {exc.strerror}") from None


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _forward(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass
