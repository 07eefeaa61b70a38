"""The broker's parts, built from the settings in one place, and the lifetime of its background
threads (reaper, audit forwarder, notifier, the dashboard's counts), started and stopped together.
Knows nothing of HTTP: it must never import Flask, and nothing here runs at import time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from . import audit
from .audit import dashboard
from .audit.absence import Cadence
from .audit.forward import Forwarder
from .audit.kept_figures import KeptFigures
from .audit.log import AuditLog
from .audit.search import AuditSearch
from .audit.signing import legacy_keyring
from .audit.transit_signing import TransitCheckpointSigner
from .audit.witness import kv_witness
from .backends import POLICY_KINDS, make_backends
from .backends.vault import make_client, vault_health
from .config import Settings, check_service_settings
from .errors import StoreUnavailable
from .grants import Grants
from .identity import BearerVerifier, ProviderMetadata
from .metrics import Metrics, Reading
from .models import isoformat, utcnow
from .notify import Notifier
from .oauth import TokenSigner
from .oauth.clients import AgentClients
from .own_token import OwnToken
from .policy import PolicyFile
from .reaper import Reaper
from .store import Store, open_store


@dataclass
class Services:
    """What one broker instance owns; the web app keeps it on `app.extensions["jit"]`, so every
    test gets its own. `start()` and `stop()` run its threads; both may be called again."""

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
    dashboard: KeptFigures  # the auditors' dashboard's figures, counted in the background
    own_token: OwnToken
    store: Store
    wake: Callable[[], None]  # this process's reaper and forwarder, when another replica changed
    signer: TokenSigner
    metrics: Metrics
    agent_clients: AgentClients  # the agents that authenticate with private_key_jwt
    _state: str = field(default="built", init=False, repr=False)  # -> running -> stopped
    _stop_listening: Callable[[], None] = field(default=lambda: None, init=False, repr=False)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Check what serving needs, then build every part; starts no thread."""
        check_service_settings(settings)
        store = open_store(settings)
        store.migrate()
        policy = PolicyFile(settings.policy_path, POLICY_KINDS)
        notifier = Notifier(settings.notify["webhook_url"], timeout=settings.notify["timeout"])
        vault = make_client(
            settings.vault["addr"], settings.vault["token"], settings.vault["timeout"]
        )
        own_token = OwnToken(vault)
        own_token.look_up()  # /readyz knows from the start whether it will lapse
        fingerprint_key = settings.secret_file("audit-hmac.key")
        # Tags what this broker issues (replicas sharing the data directory share it), so that its
        # reconciler never revokes what another broker sharing the Vault issued.
        instance = audit.fingerprint(fingerprint_key, "jit-broker instance")[-16:]
        reaper_settings = settings.reaper
        metrics = Metrics()
        grants = Grants(
            store,
            policy.current,
            make_backends(
                vault,
                settings.postgres["dsn"],
                settings.vault["timeout"],
                instance,
                task_honoured=store.task_honoured,
            ),
            fingerprint_key=fingerprint_key,
            retry_min=reaper_settings["retry_min"],
            retry_max=reaper_settings["retry_max"],
            notify=notifier.notify,
            heartbeat_every=reaper_settings["heartbeat"],
            behind_after=reaper_settings["behind_after"],
            removal_workers=reaper_settings["removal_workers"],
            vault_health=lambda: vault_health(vault, token=own_token.health),
            auditor_groups=tuple(settings.audit["auditor_groups"]),
            # Held for the broker's life: other processes on the same store see this one as alive.
            processes=store.processes(),
            clock=store.now,  # deadlines by the database's clock (each replica's would differ)
            metrics=metrics,
        )
        audit_log = AuditLog(
            store,
            fingerprint_key,
            # The private key stays in OpenBao; a missing key or a token that may not sign
            # degrades /readyz (checks.checkpoints), and the chain is signed once it can be.
            TransitCheckpointSigner(
                vault,
                mount=settings.audit["transit_mount"],
                key_name=settings.audit["transit_key"],
            ),
            checkpoint_copy=settings.checkpoint_copy_path,
            keyring=legacy_keyring(settings.signing_key_path),
            cadence=Cadence(
                settings.audit["checkpoint_every"], settings.audit["checkpoint_tolerance"]
            ),
            witness=kv_witness(vault, settings.audit["witness_kv"]),
        )
        reaper = Reaper(
            grants,
            reaper_settings["heartbeat"],
            reaper_settings["reconcile_every"],
            checkpoint=audit_log.checkpoint_and_advance,
            checkpoint_every=settings.audit["checkpoint_every"],
            renew_token=own_token.renew_if_due,
        )
        audit_settings = settings.audit
        forwarding = store.leadership("forward")  # one forwarder for all processes
        forwarder = Forwarder(
            store,
            audit_settings["forward_url"],
            token=audit_settings["forward_token"],
            timeout=audit_settings["forward_timeout"],
            batch=audit_settings["forward_batch"],
            lead=forwarding.holds,
            resign=forwarding.close,
        )

        def wake() -> None:  # the reaper's deadlines, and new audit entries to forward
            reaper.wake()
            forwarder.wake()

        def on_change() -> None:  # and those of every other replica on the store
            wake()
            try:
                store.announce()
            except StoreUnavailable:
                pass  # the others' reapers still find it at their next pass

        grants.on_change = on_change
        grants.on_record = forwarder.wake
        if reaper_settings["enabled"]:
            grants.heartbeat = reaper.heartbeat  # no reaper, no issuing; unless it is switched off
        metrics.read_gauges_from(lambda: _reading(store, reaper, notifier, forwarder))
        oidc = settings.oidc
        metadata = ProviderMetadata(oidc["issuer"])
        verifier = BearerVerifier(
            metadata, oidc["api_audience"], oidc["algorithms"], oidc["groups_claim"], oidc["leeway"]
        )
        audit_search = AuditSearch(audit_log, settings.audit["auditor_groups"])
        return cls(
            settings,
            grants,
            metadata,
            verifier,
            reaper,
            policy,
            notifier,
            audit_log,
            forwarder,
            audit_search,
            KeptFigures(partial(dashboard.counted, audit_search, dashboard.DAYS)),
            own_token,
            store,
            wake,
            # Reads the transit key only when asked: a missing key degrades /readyz, no crash.
            TokenSigner(
                vault,
                settings.oauth_issuer,
                mount=settings.oauth["transit_mount"],
                key_name=settings.oauth["signing_key"],
                publish_delay=settings.oauth["key_publish_delay"],
            ),
            metrics,
            AgentClients(settings.oauth["clients"]),
        )

    def start(self) -> None:
        """The reaper (unless switched off), then the forwarder and the notifier (each only when
        its URL is set), and the dashboard's first count, so that no page waits for it (only a
        process that serves pages starts its services: create_app, in each gunicorn worker).
        Once: a second call, or one after stop(), does nothing."""
        if self._state != "built":
            return
        self._state = "running"
        if self.settings.reaper["enabled"]:
            self.reaper.start()
        self.forwarder.start()
        self.notifier.start()
        self.dashboard.start()
        self._stop_listening = self.store.listen(self.wake)

    def stop(self) -> None:
        """Stop every thread, in order: the reaper first, which signs a last checkpoint over
        everything written until now; then the forwarder (what it has not delivered goes at the
        next start, from its cursor); then the notifier (messages still queued are not sent); then
        the dashboard's thread, after the count in hand.
        Call it after the server stopped taking requests. A second call does nothing."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        self._stop_listening()
        self.reaper.stop()
        self.forwarder.stop()
        self.notifier.stop()
        self.dashboard.close()
        self.store.close()


def _reading(store: Store, reaper: Reaper, notifier: Notifier, forwarder: Forwarder) -> Reading:
    """The gauges at one scrape. A store that cannot be read leaves its gauges out (unknown is
    not zero); the scrape itself still answers."""
    beat = reaper.heartbeat()
    age = (utcnow() - beat).total_seconds() if beat is not None else None
    lag = forwarder.health().get("lag") if forwarder.enabled else None
    try:
        grants, due = store.count_by_state(), store.count_due(isoformat(store.now()))
    except StoreUnavailable:
        grants, due = {}, None
    return Reading(grants, due, age, notifier.pending(), lag if isinstance(lag, int) else None)
