"""GET /api/v1/cli: what `jit login` needs to log in to this broker (the provider, the CLI's public
client, its scopes and the audience to ask its token for), so a user gives only the broker's URL.
Public: nothing in it is secret (the provider publishes the rest), and the Vault address is where
engineers' tools already go."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from ..errors import CliLoginOff
from . import services

bp = Blueprint("cli_login", __name__, url_prefix="/api/v1")


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
