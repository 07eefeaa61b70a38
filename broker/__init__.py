"""jit-broker: just-in-time elevation with verified removal. `create_app` wires the parts together
and does nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Flask

from . import audit, web
from .audit.forward import Forwarder
from .audit.log import AuditLog
from .audit.search import AuditSearch
from .backends import make_backends
from .backends.vault import make_client, vault_health
from .config import Settings, check_service_settings, load_settings
from .grants import Grants
from .identity import BearerVerifier, ProviderMetadata
from .liveness import Liveness
from .notify import Notifier
from .own_token import OwnToken
from .policy import PolicyFile
from .reaper import Reaper
from .store import Store

HERE = Path(__file__).resolve().parent
# An installed wheel carries the templates as broker/templates; a checkout keeps them at the top.
TEMPLATES = HERE / "templates" if (HERE / "templates").is_dir() else HERE.parent / "templates"


@dataclass
class Services:
    """What one app instance owns; kept on `app.extensions["jit"]` so every test gets its own."""

    settings: Settings
    grants: Grants
    metadata: ProviderMetadata
    verifier: BearerVerifier
    reaper: Reaper
    policy: PolicyFile
    notifier: Notifier
    audit_log: AuditLog
    forwarder: Forwarder
    audit_search: AuditSearch
    own_token: OwnToken


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    check_service_settings(settings)
    app = Flask(__name__, template_folder=str(TEMPLATES))
    app.config.update(
        SECRET_KEY=settings.server["secret_key"] or settings.secret_file("session.key"),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.server["base_url"].startswith("https://"),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    store = Store(settings.database_path)
    store.migrate()
    policy = PolicyFile(settings.policy_path)
    notifier = Notifier(settings.notify["webhook_url"], timeout=settings.notify["timeout"])
    vault = make_client(settings.vault["addr"], settings.vault["token"], settings.vault["timeout"])
    own_token = OwnToken(vault)
    own_token.look_up()  # /healthz knows from the start whether it will lapse
    fingerprint_key = settings.secret_file("audit-hmac.key")
    # Tags what this broker issues (replicas sharing the data directory share it), so that its
    # reconciler never revokes what another broker sharing the Vault issued.
    instance = audit.fingerprint(fingerprint_key, "jit-broker instance")[-16:]
    reaper_settings = settings.reaper
    grants = Grants(
        store,
        policy.current,
        make_backends(vault, settings.postgres["dsn"], settings.vault["timeout"], instance),
        fingerprint_key=fingerprint_key,
        retry_min=reaper_settings["retry_min"],
        retry_max=reaper_settings["retry_max"],
        notify=notifier.notify,
        heartbeat_every=reaper_settings["heartbeat"],
        vault_health=lambda: vault_health(vault, token=own_token.health),
        auditor_groups=tuple(settings.audit["auditor_groups"]),
        # Held for the app's life: other processes on the same store see this one as alive.
        processes=Liveness.beside(settings.database_path),
    )
    audit_log = AuditLog(
        store,
        fingerprint_key,
        audit.load_or_create_key(settings.signing_key_path),
        checkpoint_copy=settings.checkpoint_copy_path,
    )
    reaper = Reaper(
        grants,
        reaper_settings["heartbeat"],
        reaper_settings["reconcile_every"],
        checkpoint=audit_log.checkpoint,
        checkpoint_every=settings.audit["checkpoint_every"],
        renew_token=own_token.renew_if_due,
    )
    audit_settings = settings.audit
    forwarder = Forwarder(
        store,
        audit_settings["forward_url"],
        token=audit_settings["forward_token"],
        timeout=audit_settings["forward_timeout"],
        batch=audit_settings["forward_batch"],
    )

    def on_change() -> None:  # the reaper's deadlines, and new audit entries to forward
        reaper.wake()
        forwarder.wake()

    grants.on_change = on_change
    if reaper_settings["enabled"]:
        grants.heartbeat = reaper.heartbeat  # no reaper, no issuing; unless it is switched off
    oidc = settings.oidc
    metadata = ProviderMetadata(oidc["issuer"])
    verifier = BearerVerifier(
        metadata, oidc["api_audience"], oidc["algorithms"], oidc["groups_claim"], oidc["leeway"]
    )
    app.extensions["jit"] = Services(
        settings,
        grants,
        metadata,
        verifier,
        reaper,
        policy,
        notifier,
        audit_log,
        forwarder,
        AuditSearch(audit_log, settings.audit["auditor_groups"]),
        own_token,
    )
    web.init_app(app)
    if settings.reaper["enabled"]:
        reaper.start()
    forwarder.start()  # only when forward_url is set
    return app
