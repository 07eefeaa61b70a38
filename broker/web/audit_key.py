"""The audit log's public keys, published without authentication: anyone holding an exported
bundle checks its signed checkpoints against the keys they fetched here earlier."""

from __future__ import annotations

from flask import Blueprint

from . import services

bp = Blueprint("audit_key", __name__, url_prefix="/api/v1/audit")


@bp.get("/public-key")
def public_key() -> dict[str, object]:
    """`keys`: every version of the transit key that signs checkpoints (and a v1 key file's key,
    for the checkpoints it signed); `key_id`, `algorithm` and `public_key_pem`: the newest."""
    audit_log = services().audit_log
    keys = audit_log.published_keys()
    current = audit_log.key_id
    newest = next((k for k in keys if k["key_id"] == current), keys[-1] if keys else {})
    return {
        "algorithm": newest.get("algorithm", ""),
        "key_id": newest.get("key_id", ""),
        "public_key_pem": newest.get("public_key_pem", ""),
        "keys": keys,
    }
