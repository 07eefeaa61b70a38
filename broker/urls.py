"""The URLs the broker sends to (the notification webhook, the audit forwarder), checked without
ever being echoed: a path or query may hold a secret (Slack's is its path). Plain functions that
config, notify, audit and the CLI use; imports nothing of the broker but its errors."""

from __future__ import annotations

from ipaddress import ip_address
from urllib.parse import urlsplit

from .errors import ConfigError


def loggable_target(url: str, setting: str) -> str:
    """Scheme, host and port: the one part of `url` that may be logged. A URL that is not http(s)
    with a host is a ConfigError naming the `setting` it came from, never the URL."""
    error = f"{setting} must be an http:// or https:// URL with a host"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(error) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(error)
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: where plain http:// crosses no network."""
    if host.lower() == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
