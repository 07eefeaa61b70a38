"""The broker's Prometheus metrics: what it decided, issued and removed (counted once the
transaction recording it has committed), how long issuing and removal took, and, read at each
scrape, how many grants are in each state, how many deadlines are due and the notifier's and
forwarder's backlogs. Each broker app has its own registry (tests build many); a `jit serve` with
several worker processes writes to PROMETHEUS_MULTIPROC_DIR and any worker answers for all.
Labels are bounded: backends, states, endpoints and outcomes, never a person or a grant."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Seconds: a Vault call takes milliseconds; removal lag runs from sub-second to the retry backoff.
ISSUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # no *_created series: a scrape shows counts, not creation times


@dataclass(frozen=True)
class Reading:
    """What the gauges say at one scrape; None: not known (the store could not be read)."""

    grants: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, backend): count
    reaper_due: int | None = None
    reaper_heartbeat_age_seconds: float | None = None
    notifier_pending: int | None = None
    forward_lag: int | None = None


Gauges = Callable[[], Reading]


class Metrics:
    """The counters and histograms the use cases and the web layer feed."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "jit_decisions", "Policy decisions recorded, by outcome", ["outcome"], registry=r
        )
        self.issued = Counter("jit_issuances", "Credentials issued", ["backend"], registry=r)
        self.issue_failures = Counter(
            "jit_issue_failures", "Issuances that failed", ["backend"], registry=r
        )
        self.issue_seconds = Histogram(
            "jit_issue_seconds",
            "Issuing one credential: the Vault call and its record",
            ["backend"],
            buckets=ISSUE_BUCKETS,
            registry=r,
        )
        self.revoked = Counter(
            "jit_revocations",
            "Grants whose every credential was verified gone",
            ["backend"],
            registry=r,
        )
        self.revoke_failures = Counter(
            "jit_revocation_failures",
            "Removal passes that could not verify a credential gone (retried, alerted)",
            ["backend"],
            registry=r,
        )
        self.revocation_lag = Histogram(
            "jit_revocation_lag_seconds",
            "From a window's end (or release) to its removal verified",
            ["backend"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.dependency_errors = Counter(
            "jit_dependency_errors",
            "Requests refused because a dependency failed (vault, provider, store)",
            ["dependency"],
            registry=r,
        )
        self.http_requests = Counter(
            "jit_http_requests",
            "HTTP requests answered",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "jit_http_request_seconds",
            "Time to answer an HTTP request",
            ["endpoint", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self._gauges: Gauges | None = None

    def read_gauges_from(self, gauges: Gauges) -> None:
        """What is read at each scrape (grants by state, due deadlines, backlogs): once."""
        if self._gauges is None:
            self._gauges = gauges
            self.registry.register(_StateCollector(self._current_gauges))

    def _current_gauges(self) -> Reading:
        return self._gauges() if self._gauges is not None else Reading()

    def exposition(self) -> bytes:
        """The text format for /metrics: this process's registry, or every worker's when several
        worker processes share PROMETHEUS_MULTIPROC_DIR."""
        if not os.environ.get(MULTIPROCESS_ENV):
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        MultiProcessCollector(combined)
        combined.register(_StateCollector(self._current_gauges))
        return generate_latest(combined)


class _StateCollector(Collector):
    """Gauges read from the store and the background threads at scrape time, so every replica
    reports the same shared state and nothing goes stale between scrapes."""

    def __init__(self, read: Gauges) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        reading = self.read()
        grants = GaugeMetricFamily(
            "jit_grants", "Grants by state and backend", labels=["status", "backend"]
        )
        for (status, backend), count in reading.grants.items():
            grants.add_metric([status, backend], count)
        yield grants
        for name, text in (
            ("reaper_due", "Grant deadlines due now (window ends, retries) not yet handled"),
            ("reaper_heartbeat_age_seconds", "Seconds since the reaper's last completed pass"),
            ("notifier_pending", "Notifications waiting to be delivered"),
            ("forward_lag", "Audit entries not yet delivered to the forwarding endpoint"),
        ):
            value = getattr(reading, name)
            if value is not None:
                yield GaugeMetricFamily(f"jit_{name}", text, value=value)
