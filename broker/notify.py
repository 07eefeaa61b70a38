"""Webhook notifications (Slack-compatible JSON) to approvers and requesters, sent by one background
thread with retries. A notification never blocks a decision and never raises into it: the caller
enqueues and moves on, and a webhook that keeps failing is dropped with an ERROR log line."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests

from .durations import format_duration
from .errors import ConfigError
from .models import Grant
from .urls import loggable_target

log = logging.getLogger(__name__)

# Event names for `jit.event`, the field receivers that are not Slack route on. The reaper's
# removals (broker/grants/removal.py) also send "expired_unapproved" and "revoke_failed".
NEW_REQUEST = "new_request"
APPROVED = "approved"
DENIED = "denied"
EXPIRING = "expiring"
BREAK_GLASS = "break_glass"  # to the security channel, every time

# Seconds before each retry; after the last one the message is dropped.
RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0, 600.0)

# Slack's limits on a section block, so a long reason cannot make Slack refuse the whole message.
SLACK_TEXT_LIMIT = 3000
SLACK_FIELD_LIMIT = 2000
SLACK_MAX_FIELDS = 10


@dataclass
class Outgoing:
    """One message on its way: the payload is built once, at enqueue time; `attempts` grows."""

    event: str
    grant_id: str | None
    payload: dict
    attempts: int = 0


class Notifier:
    """Delivers notifications in the order they were enqueued. A message waiting for its retry sits
    in the heap under its retry time, so messages behind it are sent meanwhile."""

    def __init__(
        self,
        url: str | None,
        timeout: float = 5,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
        post: Callable[..., requests.Response] | None = None,
    ):
        self.url = url or ""
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        if any(delay < 0 for delay in self.retry_delays):
            raise ConfigError("notification retry delays must not be negative")
        self.target = loggable_target(self.url, "notify.webhook_url") if self.url else ""
        # Called as post(url, json=..., timeout=..., allow_redirects=False): a Session's post.
        self._post = post
        self.delivered = 0
        self.failed_attempts = 0
        self.dropped = 0
        self._ready = threading.Condition()
        self._queue: list[tuple[float, int, Outgoing]] = []  # (due, seq, message), a heap
        self._seq = itertools.count()
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._ready:
            self._start_locked()

    def notify(
        self,
        event: str,
        text: str,
        grant_id: str | None = None,
        audience: str = "",
        fields: dict[str, str] | None = None,
    ) -> None:
        """Enqueue and return at once; delivery, failure and retries happen on the thread."""
        if not self.enabled:
            return
        try:
            payload = slack_payload(event, text, grant_id, audience, fields or {})
        except Exception:  # a notification must never break the decision that triggered it
            log.error("notification %s for grant %s could not be built", event, grant_id)
            with self._ready:
                self.dropped += 1
            return
        message = Outgoing(event, grant_id, payload)
        with self._ready:
            if self._stopping:
                log.warning("notifier stopped; dropping %s for grant %s", event, grant_id)
                self.dropped += 1
                return
            heapq.heappush(self._queue, (time.monotonic(), next(self._seq), message))
            self._start_locked()
            self._ready.notify_all()

    def stop(self, timeout: float = 5) -> None:
        """Stop the thread; messages still queued are not sent (call wait_idle first to flush)."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        unsent = self.pending()
        if unsent:
            log.warning("notifier stopped with %d message(s) unsent", unsent)

    def pending(self) -> int:
        """Messages queued, waiting for a retry, or being sent right now."""
        with self._ready:
            return len(self._queue) + self._in_flight

    def wait_idle(self, timeout: float | None = None) -> bool:
        """True once nothing is queued or in flight; False if that did not happen within timeout."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def _start_locked(self) -> None:
        if self.enabled and not self._stopping and self._thread is None:
            if self._post is None:
                self._post = requests.Session().post
            self._thread = threading.Thread(
                target=self._run, args=(self._post,), name="jit-notify", daemon=True
            )
            self._thread.start()

    def _run(self, post: Callable[..., requests.Response]) -> None:
        while True:
            with self._ready:
                message = self._next_due()
                if message is None:
                    return
                self._in_flight = 1
            failure = self._send(message, post)
            with self._ready:
                self._in_flight = 0
                self._settle(message, failure)
                self._ready.notify_all()  # for wait_idle

    def _next_due(self) -> Outgoing | None:
        """Wait (holding the condition) until the earliest message is due; None when stopping."""
        while not self._stopping:
            if not self._queue:
                self._ready.wait()
                continue
            wait = self._queue[0][0] - time.monotonic()
            if wait <= 0:
                return heapq.heappop(self._queue)[2]
            self._ready.wait(wait)
        return None

    def _send(self, message: Outgoing, post: Callable[..., requests.Response]) -> str:
        """One attempt; returns "" when delivered, or why not. Never the exception's text: requests
        puts the URL, secret path and all, into its messages."""
        try:
            response = post(
                self.url, json=message.payload, timeout=self.timeout, allow_redirects=False
            )
        except Exception as exc:
            return type(exc).__name__
        if 200 <= response.status_code < 300:
            return ""
        return f"HTTP {response.status_code}"

    def _settle(self, message: Outgoing, failure: str) -> None:
        if not failure:
            self.delivered += 1
            return
        self.failed_attempts += 1
        message.attempts += 1
        if message.attempts <= len(self.retry_delays):
            delay = self.retry_delays[message.attempts - 1]
            log.warning(
                "webhook %s: %s for grant %s failed (%s); retrying in %ss",
                self.target,
                message.event,
                message.grant_id,
                failure,
                delay,
            )
            due = time.monotonic() + delay
            heapq.heappush(self._queue, (due, next(self._seq), message))
        else:
            self.dropped += 1
            log.error(
                "webhook %s: dropped %s for grant %s after %d attempts (last: %s)",
                self.target,
                message.event,
                message.grant_id,
                message.attempts,
                failure,
            )


def slack_payload(
    event: str, text: str, grant_id: str | None, audience: str, fields: dict[str, str]
) -> dict:
    """Slack incoming-webhook JSON, plus a `jit` key with the same facts for other receivers.
    Text is escaped for Slack, so a reason like `<!channel>` cannot ping a whole channel."""
    fields = {str(name): str(value) for name, value in fields.items()}
    blocks: list[dict] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _slack(text, SLACK_TEXT_LIMIT)}}
    ]
    if fields:
        shown = list(fields.items())[:SLACK_MAX_FIELDS]
        blocks.append(
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _slack(f"{name}\n{value}", SLACK_FIELD_LIMIT)}
                    for name, value in shown
                ],
            }
        )
    return {
        "text": _slack(text, SLACK_TEXT_LIMIT),
        "blocks": blocks,
        "jit": {"event": event, "grant_id": grant_id, "audience": audience, "fields": fields},
    }


def new_request_text(grant: Grant) -> str:
    text = (
        f"{grant.requester} asks for {grant.entitlement} for {format_duration(grant.duration)}"
        f" (grant {grant.id}). Reason: {_clip(grant.reason, 300)}"
    )
    if grant.ticket:
        text += f" Ticket: {grant.ticket}."
    return text


def break_glass_text(grant: Grant) -> str:
    return (
        f":rotating_light: BREAK-GLASS: {grant.requester} took {grant.entitlement} without "
        f"approval until {grant.window_end} (grant {grant.id}). Reason: "
        f"{_clip(grant.reason, 300)} Review due by {grant.review_due}."
    )


def approved_text(grant: Grant, approver_display: str) -> str:
    return (
        f"{approver_display} approved your request for {grant.entitlement} (grant {grant.id}),"
        f" window {grant.window_start} to {grant.window_end}."
    )


def denied_text(grant: Grant, denier_display: str, reason: str) -> str:
    text = f"{denier_display} denied your request for {grant.entitlement} (grant {grant.id})."
    if reason:
        text += f" Reason: {_clip(reason, 300)}"
    return text


def expiring_text(grant: Grant, minutes_left: int) -> str:
    unit = "minute" if minutes_left == 1 else "minutes"
    return (
        f"Your access to {grant.entitlement} (grant {grant.id}) ends in {minutes_left} {unit},"
        f" at {grant.window_end}."
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack(text: str, limit: int) -> str:
    """Slack's three escapes, then clipped to Slack's limit without cutting an entity in half."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: limit - 1]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "…"
