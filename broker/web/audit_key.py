"""The audit log's public key, published without authentication: anyone holding an exported
bundle checks its signed checkpoints against the key they fetched here earlier."""

from __future__ import annotations

from flask import Blueprint

from . import services

bp = Blueprint("audit_key", __name__, url_prefix="/api/v1/audit")


@bp.get("/public-key")
def public_key() -> dict[str, str]:
    audit_log = services().audit_log
    return {
        "algorithm": "Ed25519",
        "key_id": audit_log.key_id,
        "public_key_pem": audit_log.public_key_pem,
    }
