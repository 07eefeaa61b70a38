"""The login kept for one broker: its CLI login settings, the access, refresh and ID token claims,
in <config>/brokers/<broker>/login.json (mode 0600). Hands out an access token that is still
good, renewing it with the refresh token when it has expired (under a lock, so two jit processes
do not both spend a rotating refresh token)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import NotLoggedIn
from .login import LoginInfo, check_id_token, provider_metadata, refresh_tokens
from .state import StateDir, broker_key

EARLY = 30  # seconds before its expiry an access token is renewed


class Session:
    def __init__(self, broker: str, state: StateDir, clock: Callable[[], float] = time.time):
        self.broker = broker
        self.state = state
        self.clock = clock
        self.folder = f"brokers/{broker_key(broker)}"
        self.file = f"{self.folder}/login.json"

    def saved(self) -> dict | None:
        return self.state.read(self.file)

    def save(self, info: LoginInfo, tokens: dict, claims: dict) -> None:
        """Keep a login: the tokens, when the access token expires, and who it is for."""
        self.state.write(
            self.file,
            {
                "broker": self.broker,
                "login": info.as_json(),
                "access_token": tokens["access_token"],
                "refresh_token": tokens.get("refresh_token") or "",
                "expires_at": _expiry(tokens, self.clock()),
                "id_claims": {
                    name: claims[name]
                    for name in ("iss", "sub", "name", "email", "groups", "exp")
                    if name in claims
                },
            },
        )

    def forget(self) -> dict | None:
        """Remove the login; returns what it was (None: there was none)."""
        saved = self.saved()
        self.state.remove(self.file)
        return saved

    def info(self) -> LoginInfo:
        return LoginInfo.from_json(self._required()["login"], str(self.state.path(self.file)))

    def access_token(self, renew: bool = False) -> str:
        """A good access token for the broker: the kept one, or a renewed one (always renewed
        when `renew`: the broker refused the kept one)."""
        saved = self._required()
        if not renew and saved["expires_at"] - EARLY > self.clock():
            return str(saved["access_token"])
        with self.state.lock(f"{self.folder}/renew.lock"):
            again = self._required()  # another jit may have renewed it meanwhile
            if again["access_token"] != saved["access_token"] and not renew:
                return str(again["access_token"])
            return self._renew(again)

    def _renew(self, saved: dict) -> str:
        refresh_token = saved.get("refresh_token")
        if not refresh_token:
            raise NotLoggedIn(f"your login to {self.broker} has expired; run: jit login")
        info = LoginInfo.from_json(saved["login"], str(self.state.path(self.file)))
        metadata = provider_metadata(info.issuer)
        tokens = refresh_tokens(info, metadata, refresh_token)
        claims = saved.get("id_claims") or {}
        if tokens.get("id_token"):
            claims = check_id_token(tokens, info, metadata, None)
        if not tokens.get("refresh_token"):
            tokens["refresh_token"] = refresh_token  # a provider that does not rotate it
        self.save(info, tokens, claims)
        return str(tokens["access_token"])

    def _required(self) -> dict:
        saved = self.saved()
        if saved is None or not saved.get("access_token"):
            raise NotLoggedIn(
                f"not logged in to {self.broker}; run: jit login --broker {self.broker}"
            )
        return saved


def _expiry(tokens: dict, now: float) -> float:
    if tokens.get("expires_at"):
        return float(tokens["expires_at"])
    return now + float(tokens.get("expires_in") or 300)
