"""Extensions under races, against the real OpenBao (issue 10, item 1): many extends of one grant
at once give one new credential and 409s; a release racing an extension, or a replaced credential
whose revocation failed, never lets the grant say `revoked` while one of its tokens still works."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import hvac.exceptions
import pytest

from broker import audit
from broker.backends.token import VaultTokenBackend
from broker.errors import GrantConflict
from broker.models import utcnow
from tests.helpers import ALICE, APPROVAL_POLICY, LATER, live_tokens_of, token_works

RACERS = 12


@pytest.fixture
def app(make_app):
    return make_app(policy_text=APPROVAL_POLICY)  # its `stretchy`: 10m, 5m steps, 20m in all


@pytest.fixture
def grants(app):
    return app.extensions["jit"].grants


def test_parallel_extends_give_one_new_token_and_release_leaves_none(app, api_for, tokens, openbao):
    tokens("alice")  # one login before the race, not in it
    first = api_for(app)(
        "POST", "/api/v1/requests", {"entitlement": "stretchy", "duration": "10m", "reason": "x"}
    ).json
    path = f"/api/v1/requests/{first['id']}/extend"
    start = threading.Barrier(RACERS)
    grants = app.extensions["jit"].grants
    # Whoever wins the claim is held inside Vault's call until every other extend has answered:
    # on a busy machine a late thread would otherwise start after the winner finished, and
    # rightly extend once more.
    held = HeldAfterIssue(grants.backends["vault_token"])
    grants.backends = {**grants.backends, "vault_token": held}

    def extend(_):
        api = api_for(app)  # a client per thread
        start.wait(timeout=30)
        return api("POST", path, {"duration": "5m"})

    with ThreadPoolExecutor(RACERS) as pool:
        racing = [pool.submit(extend, i) for i in range(RACERS)]
        assert held.issued.wait(30)
        deadline = time.monotonic() + 30
        while sum(f.done() for f in racing) < RACERS - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.resume.set()
        answers = [f.result() for f in racing]

    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] + [409] * (RACERS - 1), [a.json for a in answers]
    refused = [a.json for a in answers if a.status_code == 409]
    assert all(body["error"] == "conflict" and body["detail"] for body in refused)
    (winner,) = [a.json for a in answers if a.status_code == 200]
    grant = grants.store.get_grant(first["id"])
    # OpenBao holds one token for the grant: the winner's, which the grant records.
    assert live_tokens_of(openbao, grant.id) == {grant.handle}
    assert token_works(openbao, winner["credential"]["token"])
    assert not token_works(openbao, first["credential"]["token"])
    assert [e["type"] for e in grants.chain(grant.id)].count("extend") == 1

    assert api_for(app)("POST", f"/api/v1/requests/{grant.id}/release").status_code == 200
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()
    assert not token_works(openbao, winner["credential"]["token"])
    assert audit.verify(grants.store.audit_entries()).ok


class HeldAfterIssue(VaultTokenBackend):
    """The real token backend, its first issue paused after OpenBao has issued and before the
    broker records: the moment a release (or another extension) can slip in."""

    def __init__(self, real: VaultTokenBackend):
        super().__init__(real.client, real.instance)
        self.issued = threading.Event()
        self.resume = threading.Event()
        self.credentials = []

    def issue(self, *args, **kwargs):
        credential = super().issue(*args, **kwargs)
        self.credentials.append(credential)
        if not self.issued.is_set():
            self.issued.set()
            assert self.resume.wait(30)
        return credential


@contextmanager
def an_extension_held_after_issue(grants, grant_id: str):
    """Alice extends the grant by 5m in a thread of its own, held once OpenBao has issued and
    before the broker records; the with-body runs then, and the extension is let go and finished
    when it ends. Yields (the held backend, outcome: {"refused": GrantConflict} if it lost)."""
    held = HeldAfterIssue(grants.backends["vault_token"])
    grants.backends = {**grants.backends, "vault_token": held}
    outcome = {}

    def extend():
        try:
            grants.extend(ALICE, grant_id, "5m")
        except GrantConflict as exc:
            outcome["refused"] = exc

    extension = threading.Thread(target=extend)
    extension.start()
    try:
        assert held.issued.wait(30)
        yield held, outcome
    finally:
        held.resume.set()
        extension.join(30)


def test_a_release_racing_an_extension_is_not_revoked_before_the_new_token_is_gone(grants, openbao):
    grant, first = grants.request(ALICE, "stretchy", "10m", "race a release")
    with an_extension_held_after_issue(grants, grant.id) as (held, outcome):
        grants.release(ALICE, grant.id)
        grants.reap_due()
        # The extension's token exists in OpenBao and is on its way to the record: not revoked.
        (new,) = held.credentials
        assert token_works(openbao, new.secret)
        assert grants.store.get_grant(grant.id).status != "revoked"

    assert outcome["refused"].status == 409
    assert not token_works(openbao, new.secret)  # the loser removed what it made
    grants.reap_due(utcnow() + timedelta(seconds=5))
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()
    assert not token_works(openbao, first.secret)
    chain = grants.chain(grant.id)
    (lost,) = [e["data"] for e in chain if e["type"] == "extend_lost"]
    assert lost["handle"] == grants._fingerprint(new.handle)
    assert new.handle not in str(chain) and new.secret not in str(chain)
    assert audit.verify(grants.store.audit_entries()).ok


def test_an_extension_records_only_over_the_credential_it_replaces(grants, openbao):
    """A claim left by an extension that seems to have died (older than the issuance grace) is
    taken over; should the first one come back after all, its record is conditional on the
    credential it saw, which the second replaced: it loses, and removes what it made."""
    grant, first = grants.request(ALICE, "stretchy", "10m", "slow extension")
    with an_extension_held_after_issue(grants, grant.id) as (held, outcome):
        grants.clock = lambda: utcnow() + LATER  # the slow one's claim looks abandoned
        _, second = grants.extend(ALICE, grant.id, "5m")

    assert outcome["refused"].status == 409
    slow_one = held.credentials[0]
    recorded = grants.store.get_grant(grant.id)
    assert recorded.handle == second.handle != slow_one.handle
    assert token_works(openbao, second.secret)
    assert not token_works(openbao, slow_one.secret) and not token_works(openbao, first.secret)
    assert live_tokens_of(openbao, grant.id) == {second.handle}
    grants.clock = utcnow
    grants.release(ALICE, grant.id)
    grants.reap_due()
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert live_tokens_of(openbao, grant.id) == set()
    assert audit.verify(grants.store.audit_entries()).ok


class RevocationRefused(VaultTokenBackend):
    """The real token backend, except that revoking the tokens in `refused` goes to OpenBao with
    a token that may look accessors up but not revoke them: OpenBao itself says no."""

    def __init__(self, real: VaultTokenBackend, weak: hvac.Client):
        super().__init__(real.client, real.instance)
        self.weak = VaultTokenBackend(weak, real.instance)
        self.refused: set[str] = set()

    def revoke(self, handle: str) -> None:
        (self.weak if handle in self.refused else super()).revoke(handle)


@pytest.fixture
def weak_vault(openbao):
    root = openbao.client()
    root.sys.create_or_update_policy(
        "jit-test-lookup-only", 'path "auth/token/lookup-accessor" { capabilities = ["update"] }'
    )
    token = root.auth.token.create(policies=["jit-test-lookup-only"], ttl="10m")["auth"]
    yield hvac.Client(url=openbao.addr, token=token["client_token"])
    root.auth.token.revoke_accessor(token["accessor"])


def test_a_replaced_token_whose_revocation_failed_keeps_the_grant_from_revoked(
    grants, openbao, weak_vault
):
    grant, first = grants.request(ALICE, "stretchy", "10m", "replaced, not removed")
    refusing = RevocationRefused(grants.backends["vault_token"], weak_vault)
    refusing.refused.add(first.handle)
    grants.backends = {**grants.backends, "vault_token": refusing}

    _, second = grants.extend(ALICE, grant.id, "5m")
    assert token_works(openbao, first.secret)  # OpenBao refused to revoke it
    verify = [e["data"] for e in grants.chain(grant.id) if e["type"] == "verify"][-1]
    assert verify["replaced"] is True and verify["gone"] is False
    # On the grant's list, not gone: the reaper's to remove, not a stray of the reconciler's.
    assert grants.reconcile(now=utcnow() + LATER) == []
    assert token_works(openbao, first.secret)

    grants.release(ALICE, grant.id)
    grants.reap_due()
    failed = grants.store.get_grant(grant.id)
    assert failed.status == "revoke_failed" and "permission denied" in failed.last_error
    assert not token_works(openbao, second.secret)
    assert token_works(openbao, first.secret)

    refusing.refused.clear()  # OpenBao lets the broker revoke again
    grants.reap_due(utcnow() + timedelta(minutes=1))
    assert grants.store.get_grant(grant.id).status == "revoked"
    assert not token_works(openbao, first.secret)
    assert live_tokens_of(openbao, grant.id) == set()
    last_verify = [e["data"] for e in grants.chain(grant.id) if e["type"] == "verify"][-1]
    assert last_verify["gone"] is True
    assert last_verify["handle"] == grants._fingerprint(first.handle)
    assert audit.verify(grants.store.audit_entries()).ok
