"""jit login, logout, whoami: logging in to a broker at the identity provider it names (the
browser on a loopback redirect, or --device), keeping the login, and saying who it is for."""

from __future__ import annotations

import time

import click

from ..client.login import browser_login, device_login, provider_metadata
from .context import client, client_options, remember_broker
from .output import emit_json, say, when


@click.command()
@client_options
@click.option("--device", is_flag=True, help="Log in on another device (SSH sessions, no browser).")
@click.option("--no-browser", is_flag=True, help="Print the login URL instead of opening it.")
@click.option(
    "--timeout",
    default=300,
    type=click.IntRange(1, 3600),
    show_default=True,
    help="Seconds to wait for the browser.",
)
def login(broker: str | None, as_json: bool, device: bool, no_browser: bool, timeout: int) -> None:
    """Log in to a broker: the browser (authorization code + PKCE on 127.0.0.1) or --device.

    The broker says where to log in; your tokens are kept for it in your config directory
    (mode 0600), and it becomes the default broker for the other commands.
    """
    found = client(broker)
    info = found.api.login_info()
    metadata = provider_metadata(info.issuer)
    if device:
        tokens, claims = device_login(info, metadata, _show_device_code)
    else:
        tokens, claims = browser_login(info, metadata, _show_login_url, not no_browser, timeout)
    found.session.save(info, tokens, claims)
    remember_broker(found.state, found.broker)
    me = found.api.me()
    if as_json:
        emit_json({"broker": found.broker, "identity": me})
        return
    say(f"logged in to {found.broker} as {_who(me)}")


def _show_login_url(url: str) -> None:
    say("log in in your browser; if it does not open, visit:")
    click.echo(f"  {url}", err=True)


def _show_device_code(started: dict) -> None:
    where = started.get("verification_uri_complete") or started.get("verification_uri")
    say(f"on any device, visit {started.get('verification_uri')} and enter the code")
    click.echo(f"  {started.get('user_code')}", err=True)
    if where and where != started.get("verification_uri"):
        click.echo(f"  (or open {where})", err=True)
    say("waiting for you to log in there...")


@click.command()
@client_options
def logout(broker: str | None, as_json: bool) -> None:
    """Forget the login for a broker (its tokens leave your config directory)."""
    found = client(broker)
    gone = found.session.forget()
    if as_json:
        emit_json({"broker": found.broker, "logged_out": gone is not None})
        return
    say(f"logged out of {found.broker}" if gone else f"was not logged in to {found.broker}")


@click.command()
@client_options
def whoami(broker: str | None, as_json: bool) -> None:
    """Who the broker takes you to be: subject, groups, and when your login's token expires."""
    found = client(broker)
    me = found.api.me()
    saved = found.session.saved() or {}
    expires = saved.get("expires_at")
    expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) if expires else None
    if as_json:
        emit_json({"broker": found.broker, "identity": me, "token_expires_at": expiry})
        return
    click.echo(f"{_who(me)} at {found.broker}")
    click.echo(f"  subject  {me['subject']} ({me['kind']}) from {me['issuer']}")
    click.echo(f"  groups   {', '.join(me['groups']) or 'none'}")
    renew = " (renewed by itself)" if saved.get("refresh_token") else ""
    click.echo(f"  token    expires {when(expiry)}{renew}")


def _who(me: dict) -> str:
    name, email = me.get("name"), me.get("email")
    if name and email:
        return f"{name} <{email}>"
    return str(name or email or me.get("subject"))


COMMANDS = [login, logout, whoami]
