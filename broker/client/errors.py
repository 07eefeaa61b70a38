"""What can go wrong on the client side, each with the exit code `jit` documents for it, so every
failure ends as one readable line and a code a script can test."""

from __future__ import annotations


class ClientError(Exception):
    """A failure to report in one line; exit 1 unless a subclass says otherwise."""

    exit_code = 1


class Refused(ClientError):
    """The broker denied or forbade it (a policy refusal, a denied request, not your grant)."""

    exit_code = 3


class StillPending(ClientError):
    """The request is still waiting for approval (--no-wait, Ctrl-C, a timeout) or expired
    unapproved."""

    exit_code = 4


class Unreachable(ClientError):
    """The broker or the identity provider cannot be reached or cannot serve now."""

    exit_code = 5


class NotLoggedIn(ClientError):
    """No login for this broker, or one that cannot be renewed."""

    exit_code = 6


class UnsafeStateFile(ClientError):
    """A file holding tokens or credentials that others could read, or that is not the user's."""
