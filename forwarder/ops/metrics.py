"""Numbers: the delivery counters (`Stats`) and their Prometheus export, read at scrape time.

`Stats` is the one source for both `/v1/stats` and `/metrics`; the hot path bumps plain
integers and the collectors here read them when Prometheus scrapes. The logs are in
`forwarder.ops.logs`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Label values exported from the start at 0, so rate() and alerts work before the first one.
REFUSE_REASONS = ("queue_full", "queue_bytes_full", "spool_full", "spool_error", "shutting_down")
DEAD_LETTER_REASONS = (
    "rejected",
    "redirected",
    "gave_up",
    "internal_error",
    "held_without_account",
)


@dataclass(slots=True)
class Stats:
    """Delivery counters: the one source for both /v1/stats and /metrics."""

    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    attempts: int = 0
    retries: int = 0
    auth_failures: int = 0
    invalid_requests: int = 0
    unauthorized: int = 0  # intake requests without the right token (401)
    body_timeouts: int = 0  # intake requests whose body did not arrive in time (408)
    # Drop-in fields ignored as the remote ignores them, by (bounded) name: intake/leniency.py.
    unknown_fields: Counter[str] = field(default_factory=Counter)
    lenient_values: int = 0  # drop-in conversions whose value is not a number, sent as is
    refused: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.time)
    # The latest delivery failure (a retry, a refused key or a dead letter), for `forwarder status`.
    last_error: dict[str, object] | None = None

    def note_error(self, account: str, error: str) -> None:
        """Remember the latest delivery failure: when, under which account, and what."""
        self.last_error = {"at": time.time(), "account": account, "error": error}

    def counters(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "dead_lettered": dict(self.dead_lettered),
            "refused": dict(self.refused),
            "invalid_requests": self.invalid_requests,
            "unauthorized": self.unauthorized,
            "body_timeouts": self.body_timeouts,
            "unknown_fields": dict(self.unknown_fields),
            "lenient_values": self.lenient_values,
            "attempts": self.attempts,
            "retries": self.retries,
            "auth_failures": self.auth_failures,
        }


AccountViews = Callable[[], dict[str, dict[str, Any]]]
# name -> (help, value): read at scrape time.
Readings = Callable[[], dict[str, tuple[str, float]]]
# condition -> whether it holds now (forwarder_not_ready{condition}).
Conditions = Callable[[], dict[str, bool]]


class Metrics:
    """Prometheus metrics in a registry of our own (so tests can run several daemons)."""

    def __init__(
        self,
        stats: Stats,
        gauges: Readings,
        accounts: AccountViews = dict,
        counters: Readings = dict,
        not_ready: Conditions = dict,
    ) -> None:
        # prometheus-client adds a `<name>_created` series to every counter and histogram by
        # default, exported as an extra gauge family each: undocumented, useless for rates, and
        # a second family per metric. The switch is process-wide (read at every scrape); the
        # daemon's only registry is made here.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # (untyped upstream)
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "forwarder_delivery_attempt_seconds",
            "Duration of one delivery attempt to the remote, by account.",
            ["account"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.spool_commit = Histogram(
            "forwarder_spool_commit_seconds",
            "Duration of one spool commit (write and fsync of the WAL), several requests each.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(stats, gauges, counters, not_ready))
        self.registry.register(_AccountCollector(accounts))


class _AccountCollector(Collector):
    """Per-account flow control, read from the lanes at scrape time."""

    GAUGES = (
        ("queue_depth", "Events of the account waiting in the queue.", ("queued",)),
        ("in_delivery", "Events of the account in delivery.", ("in_delivery",)),
        ("concurrency_limit", "Current concurrency limit.", ("concurrency", "limit")),
        ("sending", "Requests in flight now.", ("concurrency", "sending")),
        ("rate_tokens", "Tokens in the pacing bucket.", ("rate_limit", "tokens")),
        (
            "rate_remaining",
            "Requests left in the remote's current window, as the limiter knows it.",
            ("rate_limit", "remaining"),
        ),
        (
            "rate_limit_per_window",
            "The remote's quota per window (X-RateLimit-Limit).",
            ("rate_limit", "limit_per_window"),
        ),
        ("rate_window_seconds", "The remote's rate window.", ("rate_limit", "window_s")),
        ("paused", "1 while the remote refuses the account's key.", ("paused",)),
    )
    COUNTERS = (
        ("rate_limited", "429 answers.", ("rate_limit", "rate_limited")),
        ("breaker_opened", "Times the circuit breaker opened.", ("breaker", "opened")),
        ("delivered", "Events delivered under the account.", ("delivered",)),
    )
    BREAKER_STATES = ("closed", "open", "half_open")

    def __init__(self, accounts: AccountViews) -> None:
        self._accounts = accounts

    def collect(self) -> Iterator[Metric]:
        views = self._accounts()

        def pick(view: dict[str, Any], path: tuple[str, ...]) -> float:
            value: Any = view
            for part in path:
                value = value[part]
            return float(value)

        for name, doc, path in self.GAUGES:
            gauge = GaugeMetricFamily(f"forwarder_account_{name}", doc, labels=["account"])
            for account, view in views.items():
                gauge.add_metric([account], pick(view, path))
            yield gauge
        for name, doc, path in self.COUNTERS:
            counter = CounterMetricFamily(f"forwarder_account_{name}", doc, labels=["account"])
            for account, view in views.items():
                counter.add_metric([account], pick(view, path))
            yield counter
        breaker = GaugeMetricFamily(
            "forwarder_account_breaker_state",
            "1 for the circuit breaker's current state.",
            labels=["account", "state"],
        )
        for account, view in views.items():
            for state in self.BREAKER_STATES:
                breaker.add_metric([account, state], float(view["breaker"]["state"] == state))
        yield breaker


class _StatsCollector(Collector):
    """Reads Stats at scrape time, so the hot path only bumps plain integers."""

    def __init__(
        self,
        stats: Stats,
        gauges: Readings,
        counters: Readings = dict,
        not_ready: Conditions = dict,
    ) -> None:
        self._stats = stats
        self._gauges = gauges
        self._counters = counters
        self._not_ready = not_ready

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        simple = (
            ("events_accepted", "Events accepted (answered 202).", s.accepted),
            ("events_delivered", "Events the remote has (2xx or 409).", s.delivered),
            (
                "events_duplicate",
                "Deliveries answered 409: the remote already had it.",
                s.duplicates,
            ),
            ("delivery_attempts", "Requests sent to the remote.", s.attempts),
            ("delivery_retries", "Attempts that failed transiently and were retried.", s.retries),
            ("auth_failures", "Attempts refused with 401 or 403.", s.auth_failures),
            ("requests_invalid", "Intake requests refused as invalid (4xx).", s.invalid_requests),
            (
                "requests_body_timeout",
                "Intake requests whose body did not arrive within intake.body_timeout_s (408).",
                s.body_timeouts,
            ),
            (
                "requests_unauthorized",
                "Intake requests without the right intake.auth_token (401).",
                s.unauthorized,
            ),
            (
                "lenient_values",
                "Drop-in events with conversion=1 whose value is not a number, sent as is.",
                s.lenient_values,
            ),
        )
        for name, doc, value in simple:
            yield CounterMetricFamily(f"forwarder_{name}", doc, value=value)
        refused = CounterMetricFamily(
            "forwarder_events_refused",
            "Events refused with 503 (the app keeps them).",
            labels=["reason"],
        )
        for reason in sorted({*REFUSE_REASONS, *s.refused}):
            refused.add_metric([reason], float(s.refused[reason]))
        yield refused
        dead = CounterMetricFamily(
            "forwarder_events_dead_lettered",
            "Events written to the dead-letter file.",
            labels=["reason"],
        )
        for reason in sorted({*DEAD_LETTER_REASONS, *s.dead_lettered}):
            dead.add_metric([reason], float(s.dead_lettered[reason]))
        yield dead
        unknown = CounterMetricFamily(
            "forwarder_unknown_fields",
            "Drop-in form fields ignored as the remote ignores them, by name (the first 32 "
            "names; later ones under _other).",
            labels=["field"],
        )
        for name, times in sorted(s.unknown_fields.items()):
            unknown.add_metric([name], float(times))
        yield unknown
        for gauge, (help_text, level) in self._gauges().items():
            yield GaugeMetricFamily(f"forwarder_{gauge}", help_text, value=level)
        for counter, (help_text, count) in self._counters().items():
            yield CounterMetricFamily(f"forwarder_{counter}", help_text, value=count)
        conditions = self._not_ready()
        if conditions:
            # A fixed label set (not the free-text reason), so an alert can say why in a label.
            not_ready = GaugeMetricFamily(
                "forwarder_not_ready",
                "1 while the condition keeps /readyz at 503.",
                labels=["condition"],
            )
            for condition, holds in conditions.items():
                not_ready.add_metric([condition], float(holds))
            yield not_ready
