"""The broker's own OpenBao token: renewed from the reaper once less than half of its period is
left, and on /readyz (degraded, with the reason) when it cannot be renewed and will lapse. Against
the real OpenBao, with tokens made by the root token with the shipped policy alone."""

import logging
import re
import time
from datetime import timedelta

import pytest

from broker.models import utcnow
from broker.own_token import OwnToken
from scripts.launchers import BROKER_POLICY

LOG = "broker.own_token"


def broker_token(openbao, policy: str = BROKER_POLICY, **options) -> str:
    """What an operator makes (README), with the period or TTL the test needs."""
    made = openbao.client().auth.token.create(
        policies=[policy], no_default_policy=True, no_parent=True, **options
    )
    return made["auth"]["client_token"]


def looked_up(openbao, token: str) -> dict:
    return openbao.client().auth.token.lookup(token)["data"]


def readyz(app) -> tuple[str, dict]:
    body = app.test_client().get("/readyz").get_json()
    return body["status"], body["checks"]["vault"]


def test_the_reaper_step_renews_a_periodic_token_once_half_its_period_is_gone(make_app, openbao):
    token = broker_token(openbao, period="60s")
    app = make_app(vault={"token": token})
    own = app.extensions["jit"].own_token
    start = utcnow()

    assert own.renew_if_due(start + timedelta(seconds=20)) == pytest.approx(10, abs=2)
    assert not looked_up(openbao, token).get("last_renewal_time")  # more than half left

    own.renew_if_due(start + timedelta(seconds=40))

    after = looked_up(openbao, token)
    assert after.get("last_renewal_time")
    assert after["ttl"] >= 58  # back near the period
    vault = readyz(app)[1]
    assert vault["ok"] and vault["token"]["renewable"]


def test_the_reaper_thread_renews_it_without_being_asked(make_app, openbao):
    """The loop wakes for the token's renewal, not only at its heartbeat (30 s here)."""
    token = broker_token(openbao, period="6s")
    app = make_app(vault={"token": token}, reaper={"enabled": True})
    try:
        deadline = time.monotonic() + 10
        while not looked_up(openbao, token).get("last_renewal_time"):
            assert time.monotonic() < deadline, "the reaper never renewed the broker's token"
            time.sleep(0.2)
    finally:
        app.extensions["jit"].stop()
    assert looked_up(openbao, token)["ttl"] >= 4


def test_a_short_token_that_cannot_be_renewed_is_degraded_with_the_reason(
    make_app, openbao, caplog
):
    caplog.set_level(logging.WARNING, logger=LOG)
    token = broker_token(openbao, ttl="40m", renewable=False)
    app = make_app(vault={"token": token})

    status, vault = readyz(app)

    assert status == "degraded" and not vault["ok"]
    assert re.fullmatch(
        r"the broker's Vault token expires in (39|40)m and cannot be renewed", vault["error"]
    )
    assert app.extensions["jit"].own_token.renew_if_due() is None  # nothing to try
    assert not looked_up(openbao, token).get("last_renewal_time")
    assert "cannot be renewed" in caplog.text and token not in caplog.text


def test_a_renewal_that_fails_is_degraded_with_the_reason(make_app, openbao, caplog):
    caplog.set_level(logging.WARNING, logger=LOG)
    openbao.client().sys.create_or_update_policy(
        "jit-test-no-renew", 'path "auth/token/lookup-self" { capabilities = ["read"] }'
    )
    token = broker_token(openbao, "jit-test-no-renew", period="60s")
    app = make_app(vault={"token": token})
    assert readyz(app)[1]["ok"]

    app.extensions["jit"].own_token.renew_if_due(utcnow() + timedelta(seconds=40))

    status, vault = readyz(app)
    assert status == "degraded" and not vault["ok"]
    assert vault["error"].startswith("renewing the broker's Vault token failed")
    assert "permission denied" in vault["error"]
    assert "renewing the broker's Vault token failed" in caplog.text and token not in caplog.text


def test_a_token_without_a_ttl_needs_no_renewal_and_is_fine(openbao):
    own = OwnToken(openbao.client())  # the root token: no TTL
    own.look_up()

    assert own.renew_if_due(utcnow() + timedelta(days=365)) is None
    assert own.health() == {"ok": True, "ttl": None}
