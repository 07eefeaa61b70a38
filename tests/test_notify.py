"""Webhook notifications against a real local HTTP receiver: the payload Slack gets, the caller
never waiting on the network, retries, drops logged without the URL's secret, and ordering."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from broker.errors import ConfigError
from broker.models import Grant
from broker.notify import (
    Notifier,
    approved_text,
    denied_text,
    expiring_text,
    new_request_text,
)
from scripts.launchers import free_port
from tests.helpers import HttpReceiver, wait_until

SECRET_PATH = "/services/T0001/B0002/s3cr3tW3bh00kPath"
FAST = (0.05, 0.1, 0.2)


class Receiver(HttpReceiver):
    """A webhook endpoint that misbehaves on request: answer 500 for the first `fail_first`
    requests or for events in `fail_events`, or hold the next answer back `delay` seconds."""

    def __init__(self, port: int = 0):
        self.fail_first = 0
        self.fail_events: set[str] = set()
        self.delay = 0.0
        super().__init__(port, SECRET_PATH)

    def answer(self, body: dict) -> tuple[int, float]:
        delay, self.delay = self.delay, 0.0  # a delay applies to one request
        failing = len(self.bodies) <= self.fail_first or body["jit"]["event"] in self.fail_events
        return (500 if failing else 200), delay

    def events(self, accepted_only: bool = False) -> list[str]:
        return [body["jit"]["event"] for body in (self.accepted if accepted_only else self.bodies)]


@pytest.fixture
def receiver() -> Callable[..., Receiver]:
    started: list[Receiver] = []

    def start(port: int = 0) -> Receiver:
        started.append(Receiver(port))
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.fixture
def notifier() -> Callable[..., Notifier]:
    made: list[Notifier] = []

    def make(url: str | None, **options) -> Notifier:
        options.setdefault("retry_delays", FAST)
        made.append(Notifier(url, **options))
        return made[-1]

    yield make
    for each in made:
        each.stop(timeout=1)


def notifier_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "jit-notify"]


GRANT = Grant(
    id="g-123",
    requester_iss="https://idp",
    requester_sub="alice",
    requester="alice@example.com",
    entitlement="kv-read",
    reason="rotate the <!channel> & db keys",
    duration=5400,
    status="pending",
    created_at="2024-05-01T10:00:00Z",
    window_start="2024-05-01T10:00:00Z",
    window_end="2024-05-01T11:30:00Z",
    backend="token",
    policy_hash="abc",
    handle="hvs.accessor-never-shown",
    ticket="OPS-42",
)


def test_delivered_payload_is_slack_text_and_blocks_with_jit_data(receiver, notifier):
    endpoint = receiver()
    notes = notifier(endpoint.url)

    notes.notify(
        "new_request",
        "alice asks for kv-read <!channel> & more",
        grant_id="g-123",
        audience="approvers",
        fields={"entitlement": "kv-read", "ticket": "OPS-42"},
    )

    assert notes.wait_idle(2)
    assert notes.delivered == 1 and notes.failed_attempts == 0 and notes.dropped == 0
    [body] = endpoint.bodies
    assert endpoint.headers[0]["Content-Type"] == "application/json"
    escaped = "alice asks for kv-read &lt;!channel&gt; &amp; more"  # no channel-wide ping
    assert body["text"] == escaped
    section, facts = body["blocks"]
    assert section == {"type": "section", "text": {"type": "mrkdwn", "text": escaped}}
    assert facts["type"] == "section"
    assert [field["text"] for field in facts["fields"]] == [
        "entitlement\nkv-read",
        "ticket\nOPS-42",
    ]
    assert body["jit"] == {
        "event": "new_request",
        "grant_id": "g-123",
        "audience": "approvers",
        "fields": {"entitlement": "kv-read", "ticket": "OPS-42"},
    }


def test_without_fields_there_is_one_block(receiver, notifier):
    endpoint = receiver()
    notes = notifier(endpoint.url)
    notes.notify("denied", "denied")
    assert notes.wait_idle(2)
    assert len(endpoint.bodies[0]["blocks"]) == 1
    assert endpoint.bodies[0]["jit"]["grant_id"] is None


def test_notify_returns_at_once_while_the_receiver_is_slow(receiver, notifier):
    endpoint = receiver()
    endpoint.delay = 3
    notes = notifier(endpoint.url)

    started = time.monotonic()
    notes.notify("new_request", "first", grant_id="g-1")
    assert endpoint.arrived.wait(2)  # the thread is now stuck in the slow POST
    notes.notify("approved", "second", grant_id="g-2")
    assert time.monotonic() - started < 0.5  # a non-blocking check, not a benchmark
    assert notes.pending() == 2

    endpoint.release.set()
    assert notes.wait_idle(2)
    assert endpoint.events(accepted_only=True) == ["new_request", "approved"]


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt_and_retried(receiver, notifier):
    endpoint = receiver()
    endpoint.delay = 3
    notes = notifier(endpoint.url, timeout=0.2)

    notes.notify("expiring", "ends soon", grant_id="g-1")

    assert notes.wait_idle(2)
    assert (notes.delivered, notes.failed_attempts, notes.dropped) == (1, 1, 0)
    assert len(endpoint.bodies) == 2


def test_two_500s_then_200_is_delivered_once(receiver, notifier):
    endpoint = receiver()
    endpoint.fail_first = 2
    notes = notifier(endpoint.url)

    notes.notify("approved", "approved", grant_id="g-1")

    assert notes.wait_idle(2)
    assert (notes.delivered, notes.failed_attempts, notes.dropped) == (1, 2, 0)
    assert len(endpoint.bodies) == 3 and len(endpoint.accepted) == 1


def test_a_receiver_that_comes_up_later_gets_the_message(receiver, notifier):
    port = free_port()
    notes = notifier(f"http://127.0.0.1:{port}{SECRET_PATH}", retry_delays=(0.05, 0.1, 0.2, 0.4))

    notes.notify("new_request", "while down", grant_id="g-1")
    assert wait_until(lambda: notes.failed_attempts >= 1)
    endpoint = receiver(port)

    assert notes.wait_idle(2)
    assert notes.delivered == 1 and notes.dropped == 0
    assert endpoint.events(accepted_only=True) == ["new_request"]


@pytest.mark.parametrize("down", ["answers 500", "nothing listening"])
def test_always_failing_is_dropped_with_an_error_that_hides_the_url_path(
    receiver, notifier, caplog, down
):
    if down == "answers 500":
        endpoint = receiver()
        endpoint.fail_first = 100
        url = endpoint.url
    else:
        url = f"http://127.0.0.1:{free_port()}{SECRET_PATH}"
    notes = notifier(url)
    caplog.set_level(logging.WARNING, logger="broker.notify")

    notes.notify("denied", "denied", grant_id="g-77")

    assert notes.wait_idle(2)
    assert (notes.delivered, notes.failed_attempts, notes.dropped) == (0, 4, 1)
    [error] = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert "denied" in error.getMessage() and "g-77" in error.getMessage()
    assert "http://127.0.0.1" in error.getMessage()
    assert "s3cr3t" not in caplog.text and "/services/" not in caplog.text


def test_messages_arrive_in_the_order_they_were_enqueued(receiver, notifier):
    endpoint = receiver()
    notes = notifier(endpoint.url)

    for number in range(20):
        notes.notify(f"event-{number}", f"message {number}")

    assert notes.wait_idle(2)
    assert endpoint.events() == [f"event-{number}" for number in range(20)]
    assert notes.delivered == 20


def test_a_message_waiting_for_its_retry_does_not_hold_up_later_ones(receiver, notifier):
    endpoint = receiver()
    endpoint.fail_events = {"denied"}
    notes = notifier(endpoint.url, retry_delays=(30,))

    notes.notify("denied", "keeps failing", grant_id="g-bad")
    notes.notify("approved", "fine", grant_id="g-good")

    assert wait_until(lambda: notes.delivered == 1)
    assert endpoint.events(accepted_only=True) == ["approved"]
    assert notes.pending() == 1  # the failing one, waiting 30 s for its retry
    assert not notes.wait_idle(0.05)


@pytest.mark.parametrize("url", [None, ""])
def test_without_a_url_nothing_starts_and_nothing_is_sent(notifier, url):
    notes = notifier(url)

    notes.notify("new_request", "nobody listens", grant_id="g-1")
    notes.start()

    assert not notes.enabled and not notes.running
    assert notifier_threads() == []
    assert notes.pending() == 0 and notes.wait_idle(0)
    assert (notes.delivered, notes.failed_attempts, notes.dropped) == (0, 0, 0)


def test_stop_ends_the_thread_and_later_messages_are_not_sent(receiver, notifier):
    endpoint = receiver()
    notes = notifier(endpoint.url)
    notes.notify("new_request", "before stop")
    assert notes.wait_idle(2)
    assert notes.running

    notes.stop()

    assert not notes.running and notifier_threads() == []
    notes.notify("approved", "after stop")
    assert notes.dropped == 1
    assert endpoint.events() == ["new_request"]


def test_a_shared_session_is_used_for_posting(receiver, notifier):
    endpoint = receiver()
    session = requests.Session()
    session.headers["X-Broker"] = "jit"
    notes = notifier(endpoint.url, post=session.post)

    notes.notify("new_request", "via the session")

    assert notes.wait_idle(2)
    assert endpoint.headers[0]["X-Broker"] == "jit"


def test_a_redirect_is_a_failure_not_followed(receiver, notifier):
    target = receiver()
    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), _redirect_to(target.url))
    threading.Thread(target=redirecting.serve_forever, args=(0.02,), daemon=True).start()
    try:
        notes = notifier(f"http://127.0.0.1:{redirecting.server_address[1]}/hook")
        notes.notify("new_request", "redirected")
        assert notes.wait_idle(2)
    finally:
        redirecting.shutdown()
        redirecting.server_close()
    assert notes.dropped == 1 and target.bodies == []


def _redirect_to(location: str) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return Redirect


@pytest.mark.parametrize(
    "url", ["hooks.slack.com/services/x", "ftp://example.com/x", "http://host:notaport/x"]
)
def test_a_webhook_url_that_is_not_http_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError) as refused:
        Notifier(url)
    assert "services" not in str(refused.value) and "/x" not in str(refused.value)


def test_message_texts_name_the_grant_and_never_its_handle():
    texts = [
        new_request_text(GRANT),
        approved_text(GRANT, "bob@example.com"),
        denied_text(GRANT, "bob@example.com", "no ticket"),
        expiring_text(GRANT, 5),
    ]
    for text in texts:
        assert "g-123" in text and "kv-read" in text
        assert GRANT.handle not in text

    assert "alice@example.com" in texts[0] and "1h30m" in texts[0] and "OPS-42" in texts[0]
    assert GRANT.reason in texts[0]
    assert "bob@example.com approved" in texts[1] and GRANT.window_end in texts[1]
    assert "bob@example.com denied" in texts[2] and "no ticket" in texts[2]
    assert "5 minutes" in texts[3] and GRANT.window_end in texts[3]
    assert "1 minute," in expiring_text(GRANT, 1)


def test_a_long_reason_is_clipped_and_slack_limits_are_kept(receiver, notifier):
    endpoint = receiver()
    notes = notifier(endpoint.url)
    text = new_request_text(replace(GRANT, reason="&" * 5000))
    fields = {f"field{number}": "x" * 3000 for number in range(12)}

    notes.notify("new_request", text, fields=fields)

    assert notes.wait_idle(2)
    [body] = endpoint.bodies
    assert len(body["text"]) <= 3000 and not body["text"].rstrip("…").endswith("&am")
    assert all(len(field["text"]) <= 2000 for field in body["blocks"][1]["fields"])
    assert len(body["blocks"][1]["fields"]) == 10
    assert len(body["jit"]["fields"]) == 12
