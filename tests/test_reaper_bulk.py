"""Windows closing by the dozen, checked in bulk (issue 15): one listing of OpenBao's token
accessors proves gone every token its own TTL removed, each such grant recorded `revoked` with a
whole chain; a token still listed goes the one-at-a-time way (revoke, then verify), and nothing
still listed is ever recorded gone without it. Against the real OpenBao, on either store."""

import subprocess
import sys
import threading
import time
from datetime import timedelta

import hvac.exceptions
import pytest

from broker import audit
from broker.backends.token import VaultTokenBackend
from broker.errors import VaultUnavailable
from broker.grants.removal import BULK_MIN
from broker.models import isoformat, parse_time, utcnow
from tests.helpers import ALICE, token_works, types
from tests.test_replicas import config_file

MANY = BULK_MIN + 8


@pytest.fixture
def jit(make_app):
    services = make_app(reaper={"retry_min": 5, "retry_max": 60}).extensions["jit"]
    services.grants.removal_workers = 8
    return services


def expired_by_openbao(openbao, grants, count, reason="ttl"):
    """`count` grants of a three-second window, once OpenBao has removed their tokens itself (its
    lookup no longer knows the accessor): what the reaper finds after a burst of window ends."""
    made = [grants.request(ALICE, "kv-read", "3s", f"{reason} {n}") for n in range(count)]
    root = openbao.client()
    deadline = time.monotonic() + 30
    for grant, _ in made:
        while True:
            try:
                root.auth.token.lookup_accessor(grant.handle)
            except hvac.exceptions.InvalidRequest:
                break  # "invalid accessor": OpenBao has removed it
            except hvac.exceptions.Forbidden:
                pass  # what OpenBao answers while it is removing an expired token
            assert time.monotonic() < deadline, "OpenBao did not expire the tokens"
            time.sleep(0.1)
    return made


def accessor_gone(openbao, accessor) -> bool:
    try:
        openbao.client().auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:
        return True
    return False


def entries(grants, grant_id, kind):
    return [e["data"] for e in grants.chain(grant_id) if e["type"] == kind]


def test_tokens_openbao_expired_are_proven_gone_by_one_listing_with_whole_chains(jit, openbao):
    grants = jit.grants
    made = expired_by_openbao(openbao, grants, MANY)
    backend = grants.backends["vault_token"]
    lookups = []
    real_is_gone = backend.is_gone
    backend.is_gone = lambda handle: lookups.append(handle) or real_is_gone(handle)

    grants.reap_due(utcnow() + timedelta(seconds=1))

    assert lookups == []  # no lookup one at a time: the listing proved them all
    for grant, credential in made:
        assert grants.store.get_grant(grant.id).status == "revoked"
        assert types(grants, grant.id)[3:] == ["expire", "revoke", "verify"]
        (revoke,) = entries(grants, grant.id, "revoke")
        assert revoke["sent"] is False and "removed it already" in revoke["reason"]
        (verify,) = entries(grants, grant.id, "verify")
        assert verify["gone"] is True
        assert verify["method"] == "Vault no longer lists the token's accessor"
        mark = audit.fingerprint(jit.audit_log.fingerprint_key, grant.handle)
        assert verify["handle"] == revoke["handle"] == mark
        found = [e["type"] for e in grants.store.audit_entries_containing(mark)]
        assert found == ["issue", "revoke", "verify"]  # `jit audit lookup`'s index has them
        assert not token_works(openbao, credential.secret)
        assert accessor_gone(openbao, grant.handle)
        assert all(c.gone_at for c in grants.store.credentials_of(grant.id))
    assert audit.verify(grants.store.audit_entries()).ok
    assert jit.audit_log.grant_problems() == []  # `jit audit verify`'s state check


def test_a_live_token_in_the_chunk_is_revoked_and_verified_the_one_at_a_time_way(jit, openbao):
    grants = jit.grants
    live = [grants.request(ALICE, "kv-read", "2m", f"still live {n}") for n in range(3)]
    made = expired_by_openbao(openbao, grants, MANY)
    assert all(token_works(openbao, credential.secret) for _, credential in live)

    grants.reap_due(max(parse_time(grant.window_end) for grant, _ in live))

    for grant, credential in live:
        assert grants.store.get_grant(grant.id).status == "revoked"
        assert types(grants, grant.id)[3:] == ["expire", "revoke", "verify"]
        (revoke,) = entries(grants, grant.id, "revoke")
        assert revoke["accepted"] is True and "sent" not in revoke
        (verify,) = entries(grants, grant.id, "verify")
        assert verify["gone"] is True and verify["method"] == VaultTokenBackend.verify_method
        assert not token_works(openbao, credential.secret)
        assert accessor_gone(openbao, grant.handle)
    for grant, _ in made:
        assert grants.store.get_grant(grant.id).status == "revoked"
        assert entries(grants, grant.id, "verify")[0]["method"].startswith("Vault no longer lists")
    assert audit.verify(grants.store.audit_entries()).ok
    assert jit.audit_log.grant_problems() == []


def test_bulk_passes_racing_each_other_remove_each_grant_once(jit, openbao):
    """Six passes at once (as replicas would race): each claim is conditional, each record
    fenced, so every grant gets one revoke and one verify, whichever way it went."""
    grants = jit.grants
    live = [grants.request(ALICE, "kv-read", "2m", f"live {n}") for n in range(10)]
    made = expired_by_openbao(openbao, grants, 3 * MANY) + live
    end = max(parse_time(grant.window_end) for grant, _ in live)
    passes = [threading.Thread(target=grants.reap_due, args=(end,)) for _ in range(6)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()

    for grant, credential in made:
        reaped = grants.store.get_grant(grant.id)
        assert (reaped.status, reaped.attempts) == ("revoked", 1), grant.id  # claimed once
        chain = types(grants, grant.id)
        assert chain[3:] == ["expire", "revoke", "verify"], chain
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok
    assert jit.audit_log.grant_problems() == []


class Unrevocable(VaultTokenBackend):
    """The real token backend (its listing too), except that revoking the tokens in `refused`
    fails as if Vault were out of reach: those tokens stay alive and listed."""

    def __init__(self, real: VaultTokenBackend):
        super().__init__(real.client, real.instance)
        self.refused: set[str] = set()

    def revoke(self, handle: str) -> None:
        if handle in self.refused:
            raise VaultUnavailable("Vault is unavailable: ConnectionError")
        super().revoke(handle)


def test_a_token_still_listed_is_never_recorded_gone_by_the_bulk_check(jit, openbao):
    grants = jit.grants
    backend = Unrevocable(grants.backends["vault_token"])
    grants.backends = {**grants.backends, "vault_token": backend}
    stuck, credential = grants.request(ALICE, "kv-read", "2m", "revocation refused")
    backend.refused.add(stuck.handle)
    made = expired_by_openbao(openbao, grants, MANY)

    end = parse_time(stuck.window_end)
    grants.reap_due(end)

    failed = grants.store.get_grant(stuck.id)
    assert failed.status == "revoke_failed"
    assert types(grants, stuck.id)[3:] == ["expire", "revoke", "verify", "revoke_failed"]
    (verify,) = entries(grants, stuck.id, "verify")
    assert verify["gone"] is False and verify["method"] == VaultTokenBackend.verify_method
    assert token_works(openbao, credential.secret)  # honestly: alive, and the record says so
    assert all(grants.store.get_grant(g.id).status == "revoked" for g, _ in made)
    assert jit.audit_log.grant_problems() == []

    backend.refused.clear()  # Vault answers again: the retry removes it, one at a time
    grants.reap_due(end + timedelta(seconds=5))
    assert grants.store.get_grant(stuck.id).status == "revoked"
    assert not token_works(openbao, credential.secret)
    assert jit.audit_log.grant_problems() == []


class ListingRefused(VaultTokenBackend):
    """The real token backend whose bulk listing fails (Vault refuses or is out of reach)."""

    def __init__(self, real: VaultTokenBackend):
        super().__init__(real.client, real.instance)

    def gone_among(self, handles):
        raise VaultUnavailable("the broker's Vault token was refused (permission denied)")


def test_a_failed_listing_leaves_every_grant_to_the_one_at_a_time_way(jit, openbao):
    grants = jit.grants
    grants.backends = {
        **grants.backends,
        "vault_token": ListingRefused(grants.backends["vault_token"]),
    }
    made = expired_by_openbao(openbao, grants, MANY)

    grants.reap_due(utcnow() + timedelta(seconds=1))

    for grant, _ in made:
        assert grants.store.get_grant(grant.id).status == "revoked"
        assert types(grants, grant.id)[3:] == ["expire", "revoke", "verify"]
        (verify,) = entries(grants, grant.id, "verify")
        assert verify["method"] == VaultTokenBackend.verify_method
    assert jit.audit_log.grant_problems() == []


# A broker process that lists OpenBao's accessors for its bulk check and is SIGKILLed before it
# can record anything: what it leaves behind must be nothing at all.
KILLED_AFTER_LISTING = """
import os, signal, sys
from broker import create_app
from broker.config import load_settings
from broker.models import parse_time

jit = create_app(load_settings(sys.argv[1], environ={})).extensions["jit"]
backend = jit.grants.backends["vault_token"]
listing = backend.gone_among

def list_then_die(handles):
    print(len(listing(handles)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

backend.gone_among = list_then_die
jit.grants.reap_due(parse_time(sys.argv[2]))
"""


def test_a_broker_killed_in_its_bulk_check_leaves_no_claim_behind(
    tmp_path, jit, openbao, oidc_provider, broker_port, oidc_client_secret
):
    """The bulk check claims nothing while it asks Vault: a broker killed then (kill -9) leaves
    every grant as it was, and the next pass (another replica, or the restarted broker) removes
    each once, at its first attempt."""
    grants = jit.grants
    made = expired_by_openbao(openbao, grants, MANY)
    config = config_file(tmp_path, openbao, oidc_provider, broker_port, oidc_client_secret)
    now = isoformat(utcnow() + timedelta(seconds=1))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_LISTING, str(config), now],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -9, killed.stderr
    assert killed.stdout.strip() == str(MANY)  # it had proven them all gone
    assert {grants.store.get_grant(g.id).status for g, _ in made} == {"active"}

    grants.reap_due(parse_time(now))
    for grant, _ in made:
        reaped = grants.store.get_grant(grant.id)
        assert (reaped.status, reaped.attempts) == ("revoked", 1)
        assert types(grants, grant.id)[3:] == ["expire", "revoke", "verify"]
    assert audit.verify(grants.store.audit_entries()).ok
    assert jit.audit_log.grant_problems() == []
