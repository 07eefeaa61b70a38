"""The Vault client the credential backends share: making it, turning hvac and network errors into
broker errors, the token role and tags every issued token carries, listing the broker's own tokens,
the health check and the broker's shipped OpenBao policy. It knows no credential kind and never
decides what a grant may hold."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import wraps
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import hvac
import hvac.exceptions
import requests

from ..errors import VaultRejected, VaultUnavailable
from ..models import Holding, isoformat, utcnow
from .transport import DirectSession

P = ParamSpec("P")
R = TypeVar("R")

CALL_LATENCY = timedelta(milliseconds=250)
# Every token the broker issues is made through this token role (auth/token/create/jit-broker):
# its allowed_policies, not the broker's own policies, bound what a token may hold, and it makes
# orphans. See broker/openbao/jit-broker.hcl.
TOKEN_ROLE = "jit-broker"  # noqa: S105 - a role name, not a secret
UNREACHABLE = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    requests.ConnectionError,
    requests.Timeout,
)


def translate_errors(call: Callable[P, R]) -> Callable[P, R]:
    """Vault down, sealed or unreachable is VaultUnavailable (503) to everything above."""

    @wraps(call)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return call(*args, **kwargs)
        except UNREACHABLE as exc:
            raise VaultUnavailable(f"Vault is unavailable: {type(exc).__name__}") from exc
        except hvac.exceptions.Forbidden as exc:
            raise VaultUnavailable(
                "the broker's Vault token was refused (permission denied)"
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise VaultRejected(f"Vault refused the call: {exc}") from exc

    return wrapper


def make_client(addr: str, token: str, timeout: int) -> hvac.Client:
    return hvac.Client(url=addr, token=token, timeout=timeout, session=DirectSession())


def is_unknown_accessor(exc: hvac.exceptions.VaultError) -> bool:
    return isinstance(exc, hvac.exceptions.InvalidRequest) and "invalid accessor" in str(exc)


def tags(grant_id: str, requester: str, kind: str, instance: str, **extra: str) -> dict[str, str]:
    """Token metadata that lets the reconciler find what this broker made, and for which grant."""
    return {
        "jit_grant_id": grant_id,
        "jit_requester": requester,
        "jit_backend": kind,
        "jit_broker": instance,
        **extra,
    }


def broker_tokens(
    client: hvac.Client, instance: str, kind: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(accessor, lookup data) of every token tagged with a grant of this broker and made by the
    backend `kind`. Listing accessors needs `sudo` on auth/token/accessors. A token made before the
    tags existed counts as the broker's (legacy), and as a database child token when its policy is
    one of the database backend's, as a plain token otherwise."""
    for accessor in listed_accessors(client):
        try:
            data = client.auth.token.lookup_accessor(accessor)["data"]
        except hvac.exceptions.InvalidRequest as exc:
            if is_unknown_accessor(exc):
                continue  # expired between the listing and the lookup
            raise
        meta = data.get("meta") or {}
        if not meta.get("jit_grant_id"):
            continue
        if "jit_broker" in meta and meta["jit_broker"] != instance:
            continue  # another broker's, sharing this Vault
        made_by = meta.get("jit_backend") or (
            "database"
            if any(p.startswith("jit-db-") for p in data.get("policies") or [])
            else "vault_token"
        )
        if made_by == kind:
            yield accessor, data


def listed_accessors(client: hvac.Client) -> list[str]:
    """The accessor of every token Vault holds, in one LIST (`sudo` on auth/token/accessors).
    Vault lists them all unless asked for a page, and answers 404 to an empty listing."""
    try:
        return list(client.auth.token.list_accessors()["data"]["keys"])
    except hvac.exceptions.InvalidPath:
        return []


def holding_from(data: dict[str, Any], handle: str, description: str) -> Holding:
    """A Holding from a token's lookup data (as `broker_tokens` yields it)."""
    meta = data.get("meta") or {}
    created = data.get("creation_time")
    return Holding(
        grant_id=meta["jit_grant_id"],
        handle=handle,
        description=description,
        issued_at=datetime.fromtimestamp(created, UTC) if created else None,
        legacy="jit_broker" not in meta,
    )


def token_facts(data: dict[str, Any]) -> str:
    created = data.get("creation_time")
    made = isoformat(datetime.fromtimestamp(created, UTC)) if created else "at an unknown time"
    policies = ", ".join(data.get("policies") or []) or "none"
    return f"policies {policies}; made {made}; {data.get('ttl', '?')}s left"


def seconds_until(window_end: datetime) -> int:
    """Vault counts a credential's life in whole seconds from its creation second. Measuring
    from the second Vault will see (allowing for the call's latency) makes it end on the window's
    last second or just before it, never after it."""
    return int((window_end - (utcnow() + CALL_LATENCY).replace(microsecond=0)).total_seconds())


def revoke_accessor(client: hvac.Client, accessor: str) -> None:
    try:
        client.auth.token.revoke_accessor(accessor)
    except hvac.exceptions.InvalidRequest as exc:
        if not is_unknown_accessor(exc):
            raise


def openbao_policy() -> str:
    """The broker's own least-privilege OpenBao policy, shipped in the package so that an operator
    installs exactly what this version of the broker calls (`jit vault-policy` prints it)."""
    return resources.files("broker").joinpath("openbao", "jit-broker.hcl").read_text()


def vault_health(
    client: hvac.Client, timeout: float = 2, token: Callable[[], dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Whether Vault answers sys/health, and how: for /readyz, never raises. `token` is the
    broker's own token's state (`OwnToken.health`): one about to lapse degrades the check too."""
    try:
        response = client.session.get(f"{client.url}/v1/sys/health", timeout=timeout)
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return {
            "ok": False,
            "reachable": False,
            "error": f"Vault is unreachable: {type(exc).__name__}",
        }
    ok = response.status_code in (200, 429)  # 429: a standby, which forwards to the active node
    check: dict[str, Any] = {
        "ok": ok,
        "reachable": ok,  # unsealed and answering; `ok` also says the broker's token will last
        "status": response.status_code,
        "sealed": body.get("sealed"),
    }
    if not ok:
        check["error"] = f"sys/health answered {response.status_code}"
    elif token is not None:
        check["token"] = own = token()
        if not own["ok"]:
            check.update(ok=False, error=own["error"])
    return check
