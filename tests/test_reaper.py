"""Removal, step by step: `reap_due` called directly with a chosen time, against real OpenBao, and
the reaper thread's wake-up. A removal Vault could not confirm is never recorded as revoked."""

import threading
from datetime import timedelta

import pytest

from broker import audit
from broker.backends import make_backends
from broker.backends.vault import make_client
from broker.models import isoformat, parse_time, utcnow
from broker.reaper import Reaper
from scripts.launchers import free_port
from tests.helpers import ALICE, token_works, types, wait_for_status
from tests.vault_in_front import in_front_of

REVOKE = "/v1/auth/token/revoke-accessor"
LOOKUP = "/v1/auth/token/lookup-accessor"
INVALID_ACCESSOR = {"errors": ["1 error occurred:\n\t* invalid accessor\n\n"]}


@pytest.fixture
def grants(make_app):
    return make_app(reaper={"retry_min": 5, "retry_max": 60}).extensions["jit"].grants


def test_reap_due_removes_only_what_has_closed_and_returns_the_next_deadline(grants, openbao):
    short, short_credential = grants.request(ALICE, "kv-read", "10m", "short")
    long, long_credential = grants.request(ALICE, "kv-read", "40m", "long")
    end = parse_time(short.window_end)

    assert grants.reap_due(end - timedelta(seconds=1)) == end  # nothing due yet
    assert grants.store.get_grant(short.id).status == "active"

    # The long grant's next look is the warning to its requester, five minutes before its end.
    assert grants.reap_due(end) == parse_time(long.window_end) - timedelta(minutes=5)
    assert grants.store.get_grant(short.id).status == "revoked"
    assert not token_works(openbao, short_credential.secret)
    assert grants.store.get_grant(long.id).status == "active"
    assert token_works(openbao, long_credential.secret)
    grants.release(ALICE, long.id)
    assert grants.reap_due() is None


def test_unverified_removal_is_revoke_failed_then_retried_with_backoff(grants, openbao):
    alerts = []
    grants.notify = lambda event, text, **details: alerts.append((event, details["audience"]))
    grant, credential = grants.request(ALICE, "kv-read", "10m", "vault goes away")
    secret = credential.secret
    working = grants.backends
    grants.backends = make_backends(make_client(f"http://127.0.0.1:{free_port()}", "x", 2))
    end = parse_time(grant.window_end)

    next_try = grants.reap_due(end)
    failed = grants.store.get_grant(grant.id)
    assert failed.status == "revoke_failed" and "unavailable" in failed.last_error
    assert next_try == end + timedelta(seconds=5)
    assert types(grants, grant.id)[-4:] == ["expire", "revoke", "verify", "revoke_failed"]
    assert grants.chain(grant.id)[-2]["data"]["gone"] is False
    assert token_works(openbao, secret)  # honestly: still alive, and the record says so
    assert alerts == [("revoke_failed", "security")]

    assert grants.reap_due(end + timedelta(seconds=5)) == end + timedelta(seconds=15)
    assert grants.store.get_grant(grant.id).attempts == 2

    grants.backends = working
    grants.reap_due(end + timedelta(seconds=15))
    revoked = grants.store.get_grant(grant.id)
    assert (revoked.status, revoked.attempts, revoked.last_error) == ("revoked", 3, "")
    assert not token_works(openbao, secret)
    assert types(grants, grant.id)[-2:] == ["revoke", "verify"]
    assert grants.chain(grant.id)[-1]["data"]["gone"] is True
    assert audit.verify(grants.store.audit_entries()).ok


def test_the_reaper_thread_wakes_for_a_new_grant(grants, openbao):
    reaper = Reaper(grants)
    grants.on_change = reaper.wake
    reaper.start()
    try:
        # Idle with no deadline at all: only the wake-up can make it see this grant.
        grant, credential = grants.request(ALICE, "kv-read", "2s", "wake up")
        wait_for_status(grants, grant.id, "revoked", timeout=10)
        assert not token_works(openbao, credential.secret)
    finally:
        reaper.stop()


def test_the_requester_is_warned_before_the_window_closes(grants):
    sent = []
    grants.notify = lambda event, text, **details: sent.append((event, text, details))
    grant, _ = grants.request(ALICE, "kv-read", "20m", "long task")
    end = parse_time(grant.window_end)

    assert grants.reap_due(end - timedelta(minutes=6)) == end - timedelta(minutes=5)
    assert sent == []
    assert grants.reap_due(end - timedelta(minutes=5)) == end
    assert grants.store.get_grant(grant.id).status == "active"
    assert [(event, details["audience"]) for event, _, details in sent] == [
        ("expiring", "requester")
    ]
    assert "5" in sent[0][1] and grant.entitlement in sent[0][1]
    grants.release(ALICE, grant.id)


@pytest.mark.parametrize(("expired", "status"), [(True, "revoked"), (False, "revoke_failed")])
def test_a_revoke_racing_openbaos_own_expiry_is_no_failure(grants, openbao, expired, status):
    """OpenBao expired the token itself (revoke: "invalid accessor") but its lookup still shows
    it for a moment, past its expire_time: dead, so revoked and verified, no alert. The same
    lookup showing a token not yet expired stays a failure. A race a real OpenBao cannot be made
    to lose on cue, so a server in front of it answers those two calls; the rest pass through."""
    alerts = []
    grants.notify = lambda event, text, **details: alerts.append(event)
    grant, _ = grants.request(ALICE, "kv-read", "10m", "the window ends as OpenBao expires it")
    shown = utcnow() + (timedelta(seconds=-1) if expired else timedelta(minutes=5))
    with in_front_of(grants.backends["vault_token"].client) as front:
        front.answer("POST", REVOKE, 400, INVALID_ACCESSOR)
        front.answer(
            "POST",
            LOOKUP,
            200,
            {"data": {"accessor": grant.handle, "expire_time": isoformat(shown), "ttl": 0}},
        )
        grants.reap_due(parse_time(grant.window_end))
    assert grants.store.get_grant(grant.id).status == status
    assert alerts == ([] if expired else ["revoke_failed"])
    grants.backends["vault_token"].revoke(grant.handle)  # the real token, for the next tests


@pytest.mark.parametrize(("refusals", "status"), [(1, "revoked"), (3, "revoke_failed")])
def test_a_lookup_refused_while_openbao_removes_the_token_is_asked_again(
    grants, openbao, refusals, status
):
    """Revoke answers "invalid accessor" (OpenBao is removing the expired token itself) and the
    lookup racing that removal answers 403 for a moment: asked again, it says the accessor is
    gone, so revoked with no alert. A lookup refused on every try stays a failure. OpenBao
    cannot be made to answer that 403 on cue, so a server in front of it answers those calls."""
    alerts = []
    grants.notify = lambda event, text, **details: alerts.append(event)
    grant, _ = grants.request(ALICE, "kv-read", "10m", "the window ends as OpenBao expires it")
    with in_front_of(grants.backends["vault_token"].client) as front:
        front.answer("POST", REVOKE, 400, INVALID_ACCESSOR)
        for _ in range(refusals):
            front.answer("POST", LOOKUP, 403, {"errors": ["permission denied"]})
        if refusals < 3:
            front.answer("POST", LOOKUP, 400, INVALID_ACCESSOR)
        grants.reap_due(parse_time(grant.window_end))
    assert grants.store.get_grant(grant.id).status == status
    assert alerts == ([] if status == "revoked" else ["revoke_failed"])
    grants.backends["vault_token"].revoke(grant.handle)  # the real token, for the next tests


def test_windows_closing_together_are_removed_several_at_a_time_each_once(grants, openbao):
    """40 windows ending at once, removal_workers=8: removals overlap (they wait on Vault), every
    token is dead, and each grant's chain holds one revoke and one verify; the log verifies."""
    grants.removal_workers = 8
    made = [grants.request(ALICE, "kv-read", "10m", f"burst {n}") for n in range(40)]
    backend = grants.backends["vault_token"]
    real_revoke, lock, state = backend.revoke, threading.Lock(), {"now": 0, "most": 0}

    def counting_revoke(handle):  # the real revoke, counted while in flight
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            real_revoke(handle)
        finally:
            with lock:
                state["now"] -= 1

    backend.revoke = counting_revoke
    grants.reap_due(max(parse_time(grant.window_end) for grant, _ in made))

    assert state["most"] > 1  # removals overlapped
    for grant, credential in made:
        assert grants.store.get_grant(grant.id).status == "revoked"
        chain = types(grants, grant.id)
        assert chain.count("revoke") == 1 and chain.count("verify") == 1
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok


def test_releases_waiting_for_removal_race_the_reaper_and_each_is_removed_once(grants, openbao):
    """Issue 15: a release with wait removes in the caller's thread, claimed as the reaper
    claims: with reaper passes running meanwhile, each token is revoked and verified once."""
    made = [grants.request(ALICE, "kv-read", "10m", f"race {n}") for n in range(12)]
    answers, stop = {}, threading.Event()

    def reaping():
        while not stop.is_set():
            grants.reap_due()

    def release(grant_id):
        answers[grant_id] = grants.release(ALICE, grant_id, wait=True).status

    reaper = threading.Thread(target=reaping)
    reaper.start()
    releases = [threading.Thread(target=release, args=(grant.id,)) for grant, _ in made]
    for thread in releases:
        thread.start()
    for thread in releases:
        thread.join()
    stop.set()
    reaper.join()
    grants.reap_due()

    for grant, credential in made:
        assert answers[grant.id] == "revoked"  # the reaper's claim won: its verdict awaited
        assert grants.store.get_grant(grant.id).status == "revoked"
        chain = types(grants, grant.id)
        assert chain.count("revoke") == 1 and chain.count("verify") == 1
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok


def test_a_waited_release_is_two_write_transactions_and_a_failed_one_is_the_reapers(
    grants, openbao, monkeypatch
):
    """Issue 15: ?wait=verified releases and claims in one transaction and records the
    removal in a second. A removal it cannot verify answers `revoke_failed`, due for the
    reaper's retry, which then finishes it (each attempt in the chain)."""
    grant, credential = grants.request(ALICE, "kv-read", "10m", "two transactions")
    store, opened = grants.store, []
    real_transaction = store.transaction

    def counted():
        opened.append(1)
        return real_transaction()

    monkeypatch.setattr(store, "transaction", counted)
    released = grants.release(ALICE, grant.id, wait=True)
    assert (released.status, released.attempts, len(opened)) == ("revoked", 1, 2)
    assert types(grants, grant.id)[-3:] == ["release", "revoke", "verify"]
    assert not token_works(openbao, credential.secret)
    monkeypatch.undo()

    failing, failing_credential = grants.request(ALICE, "kv-read", "10m", "vault says no")
    backend = grants.backends["vault_token"]

    def unreachable(handle):
        raise OSError("Vault is unreachable")

    monkeypatch.setattr(backend, "revoke", unreachable)
    monkeypatch.setattr(backend, "is_gone", lambda handle: False)
    answered = grants.release(ALICE, failing.id, wait=True)
    assert (answered.status, answered.attempts) == ("revoke_failed", 1)
    assert token_works(openbao, failing_credential.secret)
    monkeypatch.undo()
    assert grants.reap_due(parse_time(answered.due_at)) is None
    retried = grants.store.get_grant(failing.id)
    assert (retried.status, retried.attempts) == ("revoked", 2)
    assert not token_works(openbao, failing_credential.secret)
    assert types(grants, failing.id).count("verify") == 2
    assert audit.verify(grants.store.audit_entries()).ok


def test_many_waited_releases_at_once_each_remove_their_own_once(grants, openbao):
    """32 threads each releasing their own grant with wait, at the same moment: every token
    revoked and verified once, every answer `revoked`, the chain whole."""
    made = [grants.request(ALICE, "kv-read", "10m", f"many {n}") for n in range(32)]
    answers: dict[str, str] = {}
    start = threading.Barrier(len(made))

    def release(grant_id):
        start.wait()
        answers[grant_id] = grants.release(ALICE, grant_id, wait=True).status

    threads = [threading.Thread(target=release, args=(grant.id,)) for grant, _ in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for grant, credential in made:
        assert answers[grant.id] == "revoked"
        chain = types(grants, grant.id)
        assert chain.count("revoke") == chain.count("verify") == 1
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok


def test_a_burst_reaped_by_two_racing_passes_is_removed_once_each_by_a_kept_pool(grants, openbao):
    """Issue 15: a few hundred windows ending at once, two reaper passes racing over them (as
    two replicas would): the chunks' claims are conditional and each record fenced, so every
    grant is revoked, each token verified gone once and dead in OpenBao, and the chain verifies.
    The removal threads are one kept pool, not new threads (and store connections) per pass."""
    grants.removal_workers = 8
    made = [grants.request(ALICE, "kv-read", "10m", f"burst {n}") for n in range(240)]
    end = max(parse_time(grant.window_end) for grant, _ in made)
    passes = [threading.Thread(target=grants.reap_due, args=(end,)) for _ in range(2)]
    for thread in passes:
        thread.start()
    for thread in passes:
        thread.join()
    grants.reap_due(end)

    for grant, credential in made:
        assert grants.store.get_grant(grant.id).status == "revoked"
        chain = types(grants, grant.id)
        assert chain.count("revoke") == 1 and chain.count("verify") == 1
        assert "revoke_failed" not in chain
        assert not token_works(openbao, credential.secret)
    assert audit.verify(grants.store.audit_entries()).ok
    threads = set(grants._removal_pool._threads)
    assert 0 < len(threads) <= 8
    grants.close_removal_pool()
    assert grants._removal_pool is None and not any(t.is_alive() for t in threads)
