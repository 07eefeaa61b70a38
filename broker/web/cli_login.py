"""GET /api/v1/cli: what `jit login` needs to log in to this broker (the provider, the CLI's public
client, its scopes and the audience to ask its token for), so a user gives only the broker's URL.
Public: it holds nothing the provider's own discovery document and the client id do not."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..errors import BrokerError
from . import services

bp = Blueprint("cli_login", __name__, url_prefix="/api/v1")


class CliLoginOff(BrokerError):
    """This broker names no client for the CLI ([cli] client_id is empty)."""

    status = 404
    code = "cli_login_off"


@bp.get("/cli")
def cli_login() -> Response:
    settings = services().settings
    if not settings.cli["client_id"]:
        raise CliLoginOff("this broker has no CLI login ([cli] client_id is not set)")
    response = jsonify(
        {
            "issuer": settings.oidc["issuer"],
            "client_id": settings.cli["client_id"],
            "scopes": settings.cli["scopes"],
            "audience": settings.oidc["api_audience"],
            "vault_addr": settings.cli_vault_addr,
        }
    )
    response.headers["Cache-Control"] = "max-age=300"
    return response
