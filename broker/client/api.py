"""The broker's JSON API over HTTP, as the engineers' client calls it: a bearer token from the
Session (renewed once when the broker refuses it), and every failure turned into one line taken
from the API's `error`/`detail`, typed by what the user can do about it."""

from __future__ import annotations

from typing import Any

import requests

from .errors import ClientError, NotLoggedIn, Refused, Unreachable
from .login import LoginInfo
from .session import Session

TIMEOUT = 30  # seconds; issuing a credential waits on Vault


class BrokerApi:
    def __init__(self, url: str, session: Session | None = None, timeout: float = TIMEOUT):
        self.url = url.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.http = requests.Session()

    # ---- unauthenticated ----

    def login_info(self) -> LoginInfo:
        """What the broker publishes for the CLI's login (GET /api/v1/cli)."""
        return LoginInfo.from_json(self._answer(self._send("GET", "/api/v1/cli")), self.url)

    # ---- who, what ----

    def me(self) -> dict:
        return self.call("GET", "/api/v1/me")

    def entitlements(self, everything: bool = False) -> list[dict]:
        params = {"all": "1"} if everything else None
        return list(self.call("GET", "/api/v1/entitlements", params=params)["entitlements"])

    def my_requests(self) -> list[dict]:
        return list(self.call("GET", "/api/v1/requests", params={"mine": "1"})["requests"])

    def approval_queue(self) -> list[dict]:
        params = {"pending_approval": "1"}
        return list(self.call("GET", "/api/v1/requests", params=params)["requests"])

    def grant(self, grant_id: str) -> dict:
        return self.call("GET", f"/api/v1/requests/{_segment(grant_id)}")

    def chain(self, grant_id: str) -> list[dict]:
        return list(self.call("GET", f"/api/v1/requests/{_segment(grant_id)}/chain")["entries"])

    # ---- changes ----

    def request(self, body: dict) -> dict:
        return self.call("POST", "/api/v1/requests", body)

    def act(self, grant_id: str, action: str, body: dict | None = None) -> dict:
        """approve, deny, cancel, activate, extend, release, review."""
        return self.call("POST", f"/api/v1/requests/{_segment(grant_id)}/{action}", body or {})

    # ---- the wire ----

    def call(
        self, method: str, path: str, body: dict | None = None, params: dict | None = None
    ) -> Any:
        """An authenticated call; a 401 renews the token once (it may have been revoked or
        expired early), a second one means logging in again."""
        if self.session is None:
            raise NotLoggedIn("not logged in; run: jit login --broker URL")
        response = None
        for renew in (False, True):
            token = self.session.access_token(renew=renew)
            headers = {"Authorization": f"Bearer {token}"}
            response = self._send(method, path, body, params, headers)
            if response.status_code != 401:
                break
        assert response is not None
        return self._answer(response)

    def _send(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        params: dict | None = None,
        headers: dict | None = None,
    ) -> requests.Response:
        try:
            return self.http.request(
                method,
                self.url + path,
                json=body,
                params=params,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise Unreachable(f"the broker at {self.url} did not answer in time") from None
        except requests.RequestException:
            raise Unreachable(f"cannot reach the broker at {self.url}") from None

    def _answer(self, response: requests.Response) -> Any:
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.ok and data is not None:
            return data
        said = data if isinstance(data, dict) else {}
        code = str(said.get("error") or "")
        detail = str(said.get("detail") or code or f"HTTP {response.status_code}")
        status = response.status_code
        if response.ok:
            raise ClientError(f"the broker at {self.url} answered something that is not JSON")
        if status == 401:
            raise NotLoggedIn(f"the broker refused your login ({detail}); run: jit login")
        if status == 403 or (status == 404 and code == "not_found"):
            raise Refused(detail)  # forbidden, or a grant that is not yours
        if status >= 500:
            raise Unreachable(f"the broker cannot serve this now: {detail}")
        raise ClientError(detail)


def _segment(grant_id: str) -> str:
    """A grant id as one path segment: what a user types never walks to another endpoint."""
    if not grant_id or not all(c.isalnum() or c in "-_" for c in grant_id):
        raise ClientError(f"{grant_id!r} is not a grant id")
    return grant_id
