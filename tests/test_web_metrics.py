"""GET /metrics against a broker doing real work (real OpenBao, real access tokens): what was
decided, issued and verified gone is counted once committed, with the lag from the window's end;
the gauges read the store at each scrape; a refusal caused by Vault is counted as such; no grant
id or person reaches a label; the optional metrics token is asked for."""

from prometheus_client.parser import text_string_to_metric_families

from broker.backends import make_backends
from broker.backends.vault import make_client
from broker.models import parse_time
from scripts.launchers import free_port

ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-5 metrics"}


def scrape(app, **headers) -> dict[tuple[str, tuple], float]:
    response = app.test_client().get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_grant_issued_released_and_verified_gone_is_counted_once(make_app, api_for):
    app = make_app()
    grants = app.extensions["jit"].grants
    api = api_for(app)
    before = scrape(app)
    assert value(before, "jit_grants", status="revoked", backend="vault_token") == 0

    granted = api("POST", "/api/v1/requests", ASK).get_json()
    assert api("POST", f"/api/v1/requests/{granted['id']}/release").status_code == 200
    live = scrape(app)
    assert value(live, "jit_grants", status="released", backend="vault_token") == 1
    assert value(live, "jit_reaper_due") == 1  # released: due for removal now
    grants.reap_due()
    after = scrape(app)

    assert value(after, "jit_decisions_total", outcome="allowed") == 1
    assert value(after, "jit_issuances_total", backend="vault_token") == 1
    assert value(after, "jit_issue_seconds_count", backend="vault_token") == 1
    assert value(after, "jit_revocations_total", backend="vault_token") == 1
    assert value(after, "jit_revocation_lag_seconds_count", backend="vault_token") == 1
    assert value(after, "jit_revocation_lag_seconds_bucket", backend="vault_token", le="10.0") == 1
    assert value(after, "jit_grants", status="revoked", backend="vault_token") == 1
    assert value(after, "jit_reaper_due") == 0
    assert (
        value(
            after,
            "jit_http_requests_total",
            endpoint="api.create_request",
            method="POST",
            status="201",
        )
        == 1
    )
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert granted["id"] not in text and "alice" not in text


def test_a_refused_request_and_an_unverified_removal_are_counted_as_such(make_app, api_for):
    app = make_app()
    grants = app.extensions["jit"].grants
    api = api_for(app)
    refused = api("POST", "/api/v1/requests", {**ASK, "duration": "9h"})
    assert refused.status_code == 422  # over max_duration: refused by the policy
    granted = api("POST", "/api/v1/requests", ASK).get_json()

    working = grants.backends
    grants.backends = make_backends(make_client(f"http://127.0.0.1:{free_port()}", "x", 2))
    grants.reap_due(parse_time(granted["window"]["end"]))  # removal cannot be verified
    out_of_reach = api("POST", "/api/v1/requests", ASK)
    assert out_of_reach.status_code == 503
    samples = scrape(app)
    grants.backends = working

    assert value(samples, "jit_decisions_total", outcome="refused") == 1
    assert value(samples, "jit_revocation_failures_total", backend="vault_token") == 1
    assert value(samples, "jit_revocations_total", backend="vault_token") == 0
    assert value(samples, "jit_grants", status="revoke_failed", backend="vault_token") == 1
    assert value(samples, "jit_dependency_errors_total", dependency="vault") == 1
    assert value(samples, "jit_issue_failures_total", backend="vault_token") == 1


def test_a_metrics_token_is_asked_for_when_configured(make_app):
    app = make_app(server={"metrics_token": "scrape-me"})
    client = app.test_client()

    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-it"})
    assert wrong.status_code == 401 and wrong.get_json()["error"] == "unauthenticated"
    assert ("jit_reaper_due", ()) in scrape(app, Authorization="Bearer scrape-me")
