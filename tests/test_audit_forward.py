"""Forwarding the audit log to a real local HTTP receiver: every entry, in seq order, at least once,
with the cursor moving only after a 2xx; outages (503, nothing listening, too slow) lose nothing;
a new forwarder over the same database resumes from the saved cursor; /readyz shows the lag while
the broker keeps issuing."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import pytest

from broker import audit
from broker.audit.forward import CURSOR, Forwarder
from broker.config import check_service_settings, load_settings
from broker.errors import ConfigError
from broker.models import isoformat, utcnow
from broker.store import SqliteStore, Store
from scripts.launchers import free_port
from tests.helpers import STORE, HttpReceiver, health, wait_until

SECRET_PATH = "/ingest/s3cr3tP4th"
TOKEN = "fwd-t0ken-n3ver-logged"
ASK = {"entitlement": "kv-read", "duration": "10m", "reason": "INC-7 forwarding"}


class Receiver(HttpReceiver):
    """An ingest endpoint that answers `status` (503 for an outage), each answer held back
    `delay` seconds; it can be stopped and started again on the same port."""

    def __init__(self, port: int | None = None):
        self.status = 200
        self.delay = 0.0
        super().__init__(port or free_port(), SECRET_PATH)

    def answer(self, body: dict) -> tuple[int, float]:
        return self.status, self.delay

    def batches(self) -> list[list[dict]]:
        """The batches answered 2xx, in order."""
        return [body["entries"] for body in self.accepted]

    def entries(self) -> list[dict]:
        """Every entry the receiver accepted, in arrival order (a resent batch appears twice)."""
        return [entry for batch in self.batches() for entry in batch]

    def seqs(self) -> list[int]:
        return [entry["seq"] for entry in self.entries()]


@pytest.fixture
def receiver() -> Callable[..., Receiver]:
    started: list[Receiver] = []

    def start(port: int | None = None) -> Receiver:
        started.append(Receiver(port))
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.fixture
def store(make_store) -> Store:
    store = make_store()
    store.migrate()
    return store


@pytest.fixture
def forwarder() -> Callable[..., Forwarder]:
    made: list[Forwarder] = []

    def make(store: Store, url: str, **options) -> Forwarder:
        options.setdefault("backoff_min", 0.01)
        options.setdefault("backoff_max", 0.05)
        options.setdefault("poll_every", 0.05)
        made.append(Forwarder(store, url, **options))
        return made[-1]

    yield make
    for each in made:
        each.stop(timeout=2)


def append(store: Store, count: int, type_: str = "test") -> None:
    """Real chained entries, written the way grants writes them."""
    for number in range(count):
        with store.transaction() as tx:
            tx.append(isoformat(utcnow()), type_, {"sub": "tester"}, f"g-{number}", {"n": number})


def head(store: Store) -> int:
    entry = store.audit_head()
    return entry["seq"] if entry else 0


def caught_up(store: Store) -> Callable[[], bool]:
    return lambda: store.cursor(CURSOR) == head(store)


def assert_complete_and_ordered(received: Receiver, store: Store) -> None:
    """At least once and in order, as a receiver that dedupes by seq sees it: each batch is a
    run of consecutive seqs, batches never start further back than a resend of an earlier one,
    and keeping each seq once, at its first arrival, gives exactly the stored log, without gaps."""
    starts = []
    for batch in received.batches():
        seqs = [entry["seq"] for entry in batch]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        starts.append(seqs[0])
    assert starts == sorted(starts)
    kept: list[dict] = []
    for entry in received.entries():
        if not kept or entry["seq"] > kept[-1]["seq"]:
            assert entry["seq"] == (kept[-1]["seq"] if kept else 0) + 1  # no gap
            kept.append(entry)
        else:
            assert entry == next(e for e in kept if e["seq"] == entry["seq"])  # a true duplicate
    assert kept == list(store.audit_entries())


def test_entries_arrive_in_order_in_batches_exactly_as_stored(store, receiver, forwarder):
    append(store, 25)
    endpoint = receiver()
    fwd = forwarder(store, endpoint.url, token=TOKEN, batch=10)

    fwd.start()

    assert wait_until(caught_up(store), timeout=5)
    assert [len(batch) for batch in endpoint.batches()] == [10, 10, 5]
    received = endpoint.entries()
    assert received == list(store.audit_entries())  # seq, at, type, actor, ..., prev, hash
    assert set(received[0]) == {"seq", "at", "type", "actor", "grant_id", "data", "prev", "hash"}
    assert audit.verify(received).ok  # the receiver can check the chain itself
    assert store.cursor(CURSOR) == 25 and fwd.delivered == 25
    assert endpoint.headers[0]["Authorization"] == f"Bearer {TOKEN}"
    assert endpoint.headers[0]["Content-Type"] == "application/json"
    # Each batch was synced to disk before it left (make_durable: one synced write per batch on
    # SQLite; a PostgreSQL commit is durable already).
    writes = store.db.execute("SELECT writes FROM write_check").fetchone()["writes"]
    assert writes == (3 if STORE == "sqlite" else 0)


def test_without_a_token_no_authorization_header_is_sent(store, receiver, forwarder):
    append(store, 1)
    endpoint = receiver()
    forwarder(store, endpoint.url).start()
    assert wait_until(caught_up(store), timeout=5)
    assert "Authorization" not in endpoint.headers[0]


def test_a_wake_delivers_new_entries_without_waiting_for_the_poll(store, receiver, forwarder):
    endpoint = receiver()
    fwd = forwarder(store, endpoint.url, poll_every=60)
    fwd.start()
    append(store, 3)

    fwd.wake()

    assert wait_until(caught_up(store), timeout=5)  # well before the 60 s poll
    assert endpoint.seqs() == [1, 2, 3]


def test_while_the_receiver_answers_503_the_cursor_stays_and_nothing_is_lost(
    store, receiver, forwarder, caplog
):
    caplog.set_level(logging.WARNING, logger="broker.audit.forward")
    append(store, 5)
    endpoint = receiver()
    endpoint.status = 503
    fwd = forwarder(store, endpoint.url, token=TOKEN, batch=4)

    fwd.start()
    assert wait_until(lambda: fwd.failures >= 4, timeout=5)
    append(store, 6)  # written during the outage
    fwd.wake()

    assert store.cursor(CURSOR) == 0 and endpoint.accepted == []
    assert all(body["entries"][0]["seq"] == 1 for body in endpoint.bodies)  # the same batch
    check = fwd.health()
    assert check["ok"] is False and check["last_error"] == "HTTP 503"
    assert (check["cursor"], check["head"], check["lag"]) == (0, 11, 11)
    assert check["retry_in"] == 0.05  # doubled from 0.01 up to the cap
    assert "HTTP 503" in caplog.text and "http://127.0.0.1" in caplog.text
    assert TOKEN not in caplog.text and "s3cr3t" not in caplog.text

    endpoint.status = 200
    assert wait_until(caught_up(store), timeout=5)
    assert endpoint.seqs() == list(range(1, 12))  # a 503 was not a delivery: no duplicates
    assert_complete_and_ordered(endpoint, store)
    assert wait_until(lambda: fwd.health()["ok"], timeout=2)
    check = fwd.health()
    assert check["lag"] == 0 and check["failures"] == 0 and check["last_success"]
    assert check["last_error"] == "HTTP 503"  # what happened last, kept for the operator


def test_a_receiver_that_is_down_then_restarted_on_the_same_port_gets_everything(
    store, receiver, forwarder, caplog
):
    caplog.set_level(logging.WARNING, logger="broker.audit.forward")
    endpoint = receiver()
    fwd = forwarder(store, endpoint.url, token=TOKEN, batch=3)
    append(store, 4)
    fwd.start()
    assert wait_until(caught_up(store), timeout=5)

    endpoint.stop()
    append(store, 7)
    fwd.wake()
    assert wait_until(lambda: fwd.failures >= 3, timeout=5)
    assert store.cursor(CURSOR) == 4
    assert fwd.health()["last_error"] == "ConnectionError" and fwd.health()["lag"] == 7

    endpoint.start()
    assert wait_until(caught_up(store), timeout=5)
    assert_complete_and_ordered(endpoint, store)
    assert TOKEN not in caplog.text and "s3cr3t" not in caplog.text


def test_a_receiver_slower_than_the_timeout_is_a_failure_and_the_batch_is_resent(
    store, receiver, forwarder
):
    append(store, 2)
    endpoint = receiver()
    endpoint.delay = 3
    fwd = forwarder(store, endpoint.url, timeout=0.2)

    fwd.start()
    assert wait_until(lambda: fwd.failures >= 1, timeout=5)
    assert fwd.health()["last_error"] == "ReadTimeout"
    assert store.cursor(CURSOR) == 0

    endpoint.delay = 0
    endpoint.release.set()  # the answers still held back go out now, not during the asserts
    assert wait_until(caught_up(store), timeout=5)
    # The slow answers may have been accepted after the forwarder hung up: at least once.
    assert_complete_and_ordered(endpoint, store)


def test_a_delivery_whose_cursor_was_not_saved_is_sent_again(
    store, receiver, forwarder, monkeypatch
):
    append(store, 6)
    endpoint = receiver()
    fwd = forwarder(store, endpoint.url, batch=4)
    real_set_cursor = store.set_cursor
    calls = []

    def set_cursor_failing_once(name: str, seq: int) -> None:
        calls.append(seq)
        if len(calls) == 1:  # as if the broker died right after the receiver's 200
            raise OSError("disk full")
        real_set_cursor(name, seq)

    monkeypatch.setattr(store, "set_cursor", set_cursor_failing_once)
    fwd.start()

    assert wait_until(caught_up(store), timeout=5)
    assert endpoint.seqs() == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]  # duplicates only a batch long
    assert "saving the cursor failed" in fwd.health()["last_error"]
    assert_complete_and_ordered(endpoint, store)


def test_a_new_forwarder_over_the_same_database_resumes_from_the_saved_cursor(
    make_store, store, receiver, forwarder
):
    endpoint = receiver()
    first = forwarder(store, endpoint.url, batch=5)
    append(store, 8)
    first.start()
    assert wait_until(caught_up(store), timeout=5)
    first.stop()
    append(store, 4)  # written while no forwarder runs
    sent_before = len(endpoint.bodies)

    reopened = make_store()  # as a restarted broker opens it
    second = forwarder(reopened, endpoint.url, batch=5)
    assert second.health()["cursor"] == 8 and second.health()["lag"] == 4
    second.start()

    assert wait_until(caught_up(reopened), timeout=5)
    later = endpoint.bodies[sent_before:]
    assert [entry["seq"] for body in later for entry in body["entries"]] == [9, 10, 11, 12]
    assert endpoint.seqs() == list(range(1, 13))


def test_stop_ends_the_thread_and_an_unset_url_starts_nothing(store, receiver, forwarder):
    endpoint = receiver()
    fwd = forwarder(store, endpoint.url)
    fwd.start()
    assert fwd.running
    fwd.stop()
    assert not fwd.running
    assert fwd.health()["ok"] is False and "not running" in fwd.health()["error"]

    off = forwarder(store, "")
    off.start()
    assert not off.running and off.health() == {"ok": True, "enabled": False}
    assert [t for t in threading.enumerate() if t.name == "jit-forward"] == []


# --- the broker: create_app starts it, issuing wakes it, /readyz shows it -------------------------


@pytest.fixture
def forwarding_app(make_app, receiver):
    endpoint = receiver()
    app = make_app(
        reaper={"enabled": True},
        audit={"forward_url": endpoint.url, "forward_token": TOKEN, "forward_batch": 50},
    )
    yield app, endpoint
    app.extensions["jit"].stop()


def test_the_broker_forwards_what_it_writes_and_keeps_issuing_during_an_outage(
    forwarding_app, api_for
):
    app, endpoint = forwarding_app
    jit = app.extensions["jit"]
    store = jit.grants.store
    api = api_for(app)
    assert jit.forwarder.running

    issued = api("POST", "/api/v1/requests", ASK)
    assert issued.status_code == 201
    assert wait_until(caught_up(store), timeout=10)
    grant_id = issued.get_json()["id"]
    assert [e["type"] for e in endpoint.entries() if e["grant_id"] == grant_id] == [
        e["type"] for e in store.audit_entries(grant_id)
    ]
    assert endpoint.headers[-1]["Authorization"] == f"Bearer {TOKEN}"
    status, body = health(app)
    assert (status, body["status"]) == (200, "ok")
    assert body["checks"]["forward"]["ok"] and body["checks"]["forward"]["lag"] == 0

    endpoint.status = 503
    during = api("POST", "/api/v1/requests", ASK)
    assert during.status_code == 201  # the log in the store is the record; issuing goes on
    assert wait_until(lambda: jit.forwarder.failures >= 1, timeout=10)
    status, body = health(app)
    forward = body["checks"]["forward"]
    assert (status, body["status"]) == (200, "degraded")
    assert forward["ok"] is False and forward["last_error"] == "HTTP 503"
    assert forward["lag"] > 0 and forward["lag"] == forward["head"] - forward["cursor"]
    assert TOKEN not in json.dumps(body) and "s3cr3t" not in json.dumps(body)

    endpoint.status = 200
    assert wait_until(caught_up(store), timeout=15)  # the next retry, after at most a few s
    assert_complete_and_ordered(endpoint, store)
    assert health(app)[1]["checks"]["forward"]["lag"] == 0


def test_without_a_forward_url_readyz_says_forwarding_is_off(make_app):
    app = make_app()
    assert not app.extensions["jit"].forwarder.running
    assert health(app)[1]["checks"]["forward"] == {"ok": True, "enabled": False}


# --- configuration --------------------------------------------------------------------------------


def service_settings(**audit_section):
    return load_settings(
        overrides={
            "oidc": {"issuer": "https://idp.example", "client_id": "c", "api_audience": "a"},
            "vault": {"token": "t"},
            "audit": audit_section,
        },
        environ={},
    )


@pytest.mark.parametrize(
    "url", ["ftp://siem.example/ingest", "siem.example/ingest?key=s3cr3t", "http://h:port/s3cr3t"]
)
def test_a_forward_url_that_is_not_http_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as refused:
        check_service_settings(service_settings(forward_url=url))
    assert "forward_url" in str(refused.value) and "s3cr3t" not in str(refused.value)
    with pytest.raises(ConfigError):
        Forwarder(SqliteStore(":memory:"), url)


@pytest.mark.parametrize(
    ("name", "value"), [("forward_batch", 0), ("forward_batch", -3), ("forward_timeout", 0)]
)
def test_forward_batch_and_timeout_must_be_positive(name, value):
    with pytest.raises(ConfigError, match=name):
        check_service_settings(service_settings(**{name: value}))


def test_forward_settings_come_from_the_environment_too():
    settings = load_settings(
        environ={"JIT_AUDIT_FORWARD_URL": "https://siem.example/x", "JIT_AUDIT_FORWARD_BATCH": "7"}
    )
    assert settings.audit["forward_url"] == "https://siem.example/x"
    assert settings.audit["forward_batch"] == 7


def test_of_several_processes_one_forwards_and_another_takes_over_when_it_stops(
    store, receiver, forwarder
):
    """Three brokers on one store (three forwarders, each with its own hold on the store's
    "forward" leadership, as separate processes have): one forwards, so the receiver gets each
    entry once; when that one stops, another takes over from the shared cursor."""
    endpoint = receiver()
    holds = [store.leadership("forward") for _ in range(3)]
    fwds = [
        forwarder(store, endpoint.url, batch=7, lead=hold.holds, resign=hold.close)
        for hold in holds
    ]
    append(store, 30)
    for fwd in fwds:
        fwd.start()
    assert wait_until(caught_up(store), timeout=10)
    leaders = [fwd for fwd in fwds if fwd.leading]
    assert len(leaders) == 1
    seqs = [entry["seq"] for entry in endpoint.entries()]
    assert seqs == list(range(1, 31))  # each once, in order

    leaders[0].stop(timeout=2)
    append(store, 5)
    for fwd in fwds:
        fwd.wake()
    assert wait_until(caught_up(store), timeout=10)
    assert sum(fwd.leading for fwd in fwds if fwd is not leaders[0]) == 1
    assert [entry["seq"] for entry in endpoint.entries()] == list(range(1, 36))
    for hold in holds:
        hold.close()
