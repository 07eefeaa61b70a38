"""What every engineers' command starts from: which broker (--broker, $JIT_BROKER, or the one the
last `jit login` wrote to <config>/config.json), the user's state directory, the login kept for
that broker and its API. The shared options (--broker, --json) live here too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import click

from ..client.api import BrokerApi
from ..client.credentials import CredentialCache
from ..client.errors import NotLoggedIn
from ..client.session import Session
from ..client.state import StateDir, default_root
from ..urls import is_loopback_host

DEFAULT_BROKER_FILE = "config.json"
F = TypeVar("F", bound=Callable[..., object])


def client_options(command: F) -> F:
    """--broker and --json, on every engineers' command."""
    command = click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON (for scripts)."
    )(command)
    return click.option(
        "--broker",
        envvar="JIT_BROKER",
        metavar="URL",
        help="The broker (default: $JIT_BROKER, else the one you last logged in to).",
    )(command)


@dataclass
class Client:
    state: StateDir
    broker: str
    session: Session
    api: BrokerApi
    credentials: CredentialCache


def client(broker: str | None, state: StateDir | None = None) -> Client:
    state = state or StateDir(default_root())
    url = normalized(broker) if broker else remembered_broker(state)
    session = Session(url, state)
    return Client(
        state, url, session, BrokerApi(url, session), CredentialCache(state, session.folder)
    )


def remembered_broker(state: StateDir) -> str:
    saved = state.read(DEFAULT_BROKER_FILE) or {}
    url = saved.get("broker")
    if not isinstance(url, str) or not url:
        raise NotLoggedIn("no broker known: run jit login --broker URL (or set JIT_BROKER)")
    return url


def remember_broker(state: StateDir, url: str) -> None:
    state.write(DEFAULT_BROKER_FILE, {"broker": url})


def normalized(url: str) -> str:
    """The broker's base URL, checked: http(s), a host, no query; no trailing slash."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        raise click.BadParameter(f"{url!r} is not a URL", param_hint="--broker") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise click.BadParameter(
            f"{url!r} is not a broker URL like https://jit.example.com", param_hint="--broker"
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise click.BadParameter(
            f"{url!r}: a broker is reached over https:// (http:// only on this machine)",
            param_hint="--broker",
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
