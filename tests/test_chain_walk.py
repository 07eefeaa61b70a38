"""One grant's chain from a real run against OpenBao and the OIDC provider: every step an auditor
asks about is there, with what it must say; then the log verifies, signed, online and offline."""

import hashlib
import json
from datetime import timedelta

from broker import audit
from broker.audit.bundle import verify_bundle
from broker.backends import make_backends
from broker.backends.vault import make_client
from broker.models import parse_time, utcnow
from scripts.launchers import free_port
from tests.helpers import LATER, issue_unrecorded, token_works

CHAIN_POLICY = """
[entitlements.guarded]
description = "Approved, extendable"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.guarded.requesters]
groups = ["engineers"]

[entitlements.guarded.reason]
min_length = 5
ticket = "^INC-\\\\d+$"

[entitlements.guarded.approval]
required = 1
from_groups = ["security"]

[entitlements.guarded.extend]
max_step = "10m"
max_total = "2h"

[entitlements.guarded.break_glass]
groups = ["engineers"]
reviewers = ["security"]
"""


def data_of(chain, type_):
    return [entry["data"] for entry in chain if entry["type"] == type_]


def test_a_grants_chain_holds_every_step_and_verifies(make_app, api_for, openbao, tmp_path):
    app = make_app(policy_text=CHAIN_POLICY)
    services = app.extensions["jit"]
    grants, audit_log = services.grants, services.audit_log
    api = api_for(app)
    body = {
        "entitlement": "guarded",
        "duration": "20m",
        "reason": "INC-7 rotate",
        "ticket": "INC-7",
    }

    denied = api("POST", "/api/v1/requests", body).json
    assert (
        api(
            "POST", f"/api/v1/requests/{denied['id']}/deny", {"reason": "not now"}, "bob"
        ).status_code
        == 200
    )
    grant_id = api("POST", "/api/v1/requests", body).json["id"]
    assert (
        api("POST", f"/api/v1/requests/{grant_id}/approve", {"reason": "ok"}, "dave").status_code
        == 200
    )
    active = api("POST", f"/api/v1/requests/{grant_id}/activate").json
    assert api("POST", f"/api/v1/requests/{grant_id}/extend", {"duration": "5m"}).status_code == 200
    assert api("POST", f"/api/v1/requests/{grant_id}/release").status_code == 200

    # Vault out of reach when the window closes: the attempt and its error are chained.
    working = grants.backends
    grants.backends = make_backends(make_client(f"http://127.0.0.1:{free_port()}", "x", 2))
    grants.reap_due()
    grants.backends = working
    grants.reap_due(utcnow() + timedelta(minutes=1))
    assert grants.store.get_grant(grant_id).status == "revoked"
    # Something a crash left in Vault under this grant: the reconciler's finding is chained too.
    stray = issue_unrecorded(grants, grant_id, "guarded")
    grants.reconcile(now=utcnow() + LATER)
    assert not token_works(openbao, stray.secret)

    chain = grants.chain(grant_id)
    steps = [entry["type"] for entry in chain]
    assert steps[:5] == ["request", "decision", "approval", "decision", "issue"], steps
    for step in ("extend", "release", "revoke", "verify", "revoke_failed", "reconcile"):
        assert step in steps, (step, steps)

    for entry in chain:  # who, when, which grant, linked
        assert entry["grant_id"] == grant_id and entry["at"].endswith("Z")
        assert set(entry["actor"]) == {"iss", "sub"}
    (request,) = data_of(chain, "request")
    assert request["principal"]["sub"] == "alice" and "engineers" in request["principal"]["groups"]
    assert request["principal"]["email"] == "alice@example.com"
    assert (request["reason"], request["ticket"]) == ("INC-7 rotate", "INC-7")
    policy_hash = hashlib.sha256(services.settings.policy_path.read_bytes()).hexdigest()
    decision = data_of(chain, "decision")[0]
    assert decision["allowed"] is True and decision["policy_hash"] == policy_hash
    assert decision["reasons"] and decision["approvals_required"] == 1
    (approval,) = [e for e in chain if e["type"] == "approval"]
    assert approval["actor"]["sub"] == "dave"
    (issue,) = data_of(chain, "issue")
    assert issue["backend"] == "vault_token" and issue["vault_request_id"]
    window_end = parse_time(active["window"]["end"])
    assert window_end - timedelta(seconds=5) <= parse_time(issue["expires_at"]) <= window_end
    assert issue["identifiers"]["accessor"].startswith("hmac-sha256:")
    (extend,) = data_of(chain, "extend")
    assert parse_time(extend["window_end"]) - parse_time(extend["window_end_was"]) == timedelta(
        minutes=5
    )
    replaced, failed_attempt, *_, last_attempt = data_of(chain, "revoke")
    assert replaced["replaced"] is True and replaced["accepted"] is True  # the extension's
    assert failed_attempt["accepted"] is False and "unavailable" in failed_attempt["error"]
    verifications = data_of(chain, "verify")
    assert any(v["gone"] is False and v["error"] for v in verifications)
    assert last_attempt["accepted"] is True and verifications[-1]["gone"] is True
    assert verifications[-1]["method"]
    (finding,) = data_of(chain, "reconcile")
    assert finding["gone"] is True and finding["identifiers"]["accessor"].startswith("hmac")
    denial = [e for e in grants.chain(denied["id"]) if e["type"] == "denial"]
    assert denial and denial[0]["actor"]["sub"] == "bob"
    assert denial[0]["data"]["reason"] == "not now"

    # The emergency path and its review are in the chain as well.
    emergency = {"entitlement": "guarded", "reason": "outage, all hands", "break_glass": True}
    glass_id = api("POST", "/api/v1/requests", {**emergency, "duration": "10m"}).json["id"]
    review = {"outcome": "justified", "notes": "INC-8 confirmed"}
    assert api("POST", f"/api/v1/requests/{glass_id}/review", review, "dave").status_code == 200
    glass_chain = grants.chain(glass_id)
    assert [e["type"] for e in glass_chain] == [
        "request", "decision", "break_glass", "issue", "review"
    ]  # fmt: skip
    assert data_of(glass_chain, "review")[0]["outcome"] == "justified"

    # Nothing secret anywhere; the accessor only as its HMAC, which lookup finds.
    everything = str(list(grants.store.audit_entries()))
    assert active["credential"]["token"] not in everything and stray.secret not in everything
    assert stray.handle not in everything
    assert {e["seq"] for e in audit_log.lookup(stray.handle)} == {
        e["seq"] for e in chain if e["type"] == "reconcile"
    }

    # Signed, verified online, in the timeline, and offline from an export.
    checkpoint = audit_log.checkpoint()
    assert checkpoint["size"] == grants.store.audit_head()["seq"]
    result = audit_log.verify()
    assert result.ok and result.signed_size == checkpoint["size"], str(result)
    timeline = audit_log.timeline(grant_id)
    assert timeline.verification.ok and [e["seq"] for e in timeline.entries] == [
        e["seq"] for e in chain
    ]
    bundle = tmp_path / "bundle.zip"
    audit_log.export(bundle, "ocsf")
    assert verify_bundle(bundle, audit_log.keyring()).ok


def test_the_public_keys_are_published_without_a_login_and_sign_the_checkpoints(make_app):
    app = make_app()
    audit_log = app.extensions["jit"].audit_log
    response = app.test_client().get("/api/v1/audit/public-key")
    assert response.status_code == 200
    assert response.json["key_id"] == audit_log.key_id
    assert response.json["key_id"].startswith("transit:jit-broker-audit:v")
    published = audit.Keyring.from_json(response.json["keys"])
    with audit_log.store.transaction() as tx:
        tx.append("2026-11-23T00:00:00Z", "test", {"iss": "i", "sub": "s"}, None, {})
    checkpoint = audit_log.checkpoint()
    assert checkpoint["key_id"] == response.json["key_id"]
    assert published.problem(checkpoint) == ""
    assert audit_log.checkpoint() is None  # nothing new to sign


def test_no_key_file_is_made_any_more(make_app):
    """The private key stays in OpenBao: nothing beside the database could sign."""
    services = make_app().extensions["jit"]
    with services.audit_log.store.transaction() as tx:
        tx.append("2026-11-23T00:00:00Z", "test", {"iss": "i", "sub": "s"}, None, {})
    assert services.audit_log.checkpoint()["signature"].startswith("vault:v")
    assert not services.settings.signing_key_path.exists()


def test_stopping_the_reaper_signs_a_last_checkpoint(make_app, api_for):
    app = make_app(reaper={"enabled": True})
    services = app.extensions["jit"]
    body = {"entitlement": "kv-read", "reason": "x", "duration": "5m"}
    assert api_for(app)("POST", "/api/v1/requests", body).status_code == 201
    services.reaper.stop()
    head = services.grants.store.audit_head()
    assert services.grants.store.checkpoints(first=head["seq"])[0]["head"] == head["hash"]


def test_a_timeline_names_an_entry_edited_after_the_log_was_verified(make_app, api_for):
    app = make_app()
    services = app.extensions["jit"]
    grant_id = api_for(app)(
        "POST", "/api/v1/requests", {"entitlement": "kv-read", "reason": "x", "duration": "5m"}
    ).json["id"]
    assert services.audit_log.timeline(grant_id).verification.ok
    seq = services.grants.chain(grant_id)[1]["seq"]
    data = dict(services.grants.chain(grant_id)[1]["data"], reasons=[])
    services.grants.store.db.execute(
        "UPDATE audit SET data = ? WHERE seq = ?", [json.dumps(data, separators=(",", ":")), seq]
    )
    verification = services.audit_log.timeline(grant_id).verification
    assert not verification.ok and verification.bad_seq == seq and "edited" in verification.problem
