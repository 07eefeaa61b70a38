"""What auditors hand to a SIEM is valid OCSF (issue 16): a real grant's whole chain (request,
decision, approval and denial, issue, extend, release, revoke, verify) and a break-glass grant with
its review, made through the API against the real OpenBao and OIDC provider, exported as an OCSF
bundle; every event validates against the schema of the OCSF version and profiles it declares
(the schemas shipped by the PyPI package ocsf-json-schema), and the bundle still verifies."""

import json
import zipfile

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from broker.audit.bundle import verify_bundle

POLICY = """
[entitlements.guarded]
description = "Approved, extendable, breakable"
backend = "vault_token"
vault_policies = ["jit-test-admin"]
max_duration = "1h"

[entitlements.guarded.requesters]
groups = ["engineers"]

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

_validators: dict[tuple, jsonschema.Draft202012Validator] = {}


def validator_for(event):
    """The validator of the class, version and profiles the event itself declares."""
    metadata = event["metadata"]
    key = (metadata["version"], event["class_uid"], tuple(sorted(metadata.get("profiles", []))))
    if key not in _validators:
        schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(metadata["version"]))
        name = schema.lookup_class_name_from_uid(event["class_uid"])
        _validators[key] = jsonschema.Draft202012Validator(
            schema.get_class_schema(name, list(key[2]))
        )
    return _validators[key]


def test_every_ocsf_event_of_a_real_chain_validates_against_its_declared_schema(
    make_app, api_for, tmp_path
):
    app = make_app(policy_text=POLICY)
    api = api_for(app)
    grants = app.extensions["jit"].grants
    body = {"entitlement": "guarded", "duration": "20m", "reason": "INC-7 rotate"}

    denied = api("POST", "/api/v1/requests", body).json["id"]
    assert (
        api("POST", f"/api/v1/requests/{denied}/deny", {"reason": "no"}, "bob").status_code == 200
    )
    grant_id = api("POST", "/api/v1/requests", body).json["id"]
    assert api("POST", f"/api/v1/requests/{grant_id}/approve", {}, "dave").status_code == 200
    assert api("POST", f"/api/v1/requests/{grant_id}/activate").status_code == 200
    assert api("POST", f"/api/v1/requests/{grant_id}/extend", {"duration": "5m"}).status_code == 200
    assert api("POST", f"/api/v1/requests/{grant_id}/release").status_code == 200
    glass = api("POST", "/api/v1/requests", {**body, "break_glass": True}).json["id"]
    review = {"outcome": "justified", "notes": "real outage"}
    assert api("POST", f"/api/v1/requests/{glass}/review", review, "dave").status_code == 200
    assert api("POST", f"/api/v1/requests/{glass}/release").status_code == 200
    grants.reap_due()
    app.extensions["jit"].audit_log.checkpoint()

    bundle = tmp_path / "ocsf.zip"
    app.extensions["jit"].audit_log.export(bundle, "ocsf")
    with zipfile.ZipFile(bundle) as opened:
        events = [json.loads(line) for line in opened.read("entries.ocsf.jsonl").splitlines()]

    seen = {json.loads(event["raw_data"])["type"] for event in events}
    assert {"request", "decision", "denial", "approval", "issue", "extend", "release", "revoke",
            "verify", "break_glass", "review"} <= seen  # fmt: skip
    problems = [
        f"seq {event['metadata']['sequence']} ({json.loads(event['raw_data'])['type']}): "
        f"{error.json_path}: {error.message[:200]}"
        for event in events
        for error in validator_for(event).iter_errors(event)
    ]
    assert problems == []
    assert all("host" in event["metadata"]["profiles"] for event in events if "actor" in event)
    assert verify_bundle(bundle).ok
