"""Logs and numbers: structlog with key redaction, the delivery counters, Prometheus export.

Two parts in one module (over 400 lines): the log pipeline (redaction, batched writes, the level
gate) and the numbers (`Stats` and the collectors that read it at scrape time). They share no
state; they are kept together only because every component takes both from here. Splitting them
into `ops/logs.py` and `ops/metrics.py` is a move with no logic change, left for issue 16's
remaining work.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
import structlog
from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.ops.credentials import MIN_KEY_CHARS, secret_forms

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR
REDACTED = "[redacted]"
# Label values exported from the start at 0, so rate() and alerts work before the first one.
REFUSE_REASONS = ("queue_full", "queue_bytes_full", "spool_full", "spool_error", "shutting_down")
DEAD_LETTER_REASONS = (
    "rejected",
    "redirected",
    "gave_up",
    "internal_error",
    "held_without_account",
)


# What says which line this is: never redacted. `event` is our line's name (a constant of the
# code; a stdlib record's free-text message is scrubbed apart, `_scrub_message`); the ids and
# the event's name are what a reader looks a line up by. None of them can carry one of our
# secrets by our doing: ids we make are random UUIDs, account names are configured names or a
# digest of a client's key, and an app's own event_id, recipient_id and name are the app's data,
# sent to the remote and spooled as they are (a key an app writes there is one it chose to send).
PROTECTED_KEYS = frozenset(
    {"event", "event_id", "recipient_id", "name", "account", "level", "timestamp", "logger"}
)


def _forms(secrets: Iterable[str]) -> tuple[str, ...]:
    # Each key also as its Basic token and percent-encoded; longest first across keys too.
    # Text shorter than a key can be is never taken: "4" or "delivered" would mangle every line.
    forms = {
        form for secret in secrets if len(secret) >= MIN_KEY_CHARS for form in secret_forms(secret)
    }
    return tuple(sorted(forms, key=len, reverse=True))


class Redactor:
    """A structlog processor that replaces every known secret in a log line's keys and values.

    A secret is caught in each of its forms (`credentials.secret_forms`): as itself, as the
    base64 of a Basic header, and percent-encoded. Secrets shorter than
    `credentials.MIN_KEY_CHARS` are not taken (no key is that short: they are refused where
    keys come in), and the values of `PROTECTED_KEYS` are never touched, so redaction can
    never take a line's name or ids away.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = _forms(secrets)

    def scrub(self, value: object) -> object:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            # Keys too: a remote's answer can carry a secret as an object key.
            return {
                (self.scrub(k) if isinstance(k, str) else k): self.scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(repr(value))
        return value

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.secrets:
            for key, value in list(event_dict.items()):
                if key in PROTECTED_KEYS:
                    continue
                name = self.scrub(key)
                if isinstance(name, str) and name != key:  # a key is a field's name: rare
                    del event_dict[key]
                    event_dict[name] = self.scrub(value)
                else:
                    event_dict[key] = self.scrub(value)
        return event_dict


def _json_line(obj: Any, default: Any = None, **_kw: Any) -> str:
    """One log line as JSON: orjson on the hot path (one line per delivered event)."""
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # a lone surrogate, an int past 64 bits: the standard module copes
        return json.dumps(obj, default=default)


class _BatchedStream:
    """Log lines written during one turn of the event loop, passed on in one write.

    Every delivered event logs a line; a write and flush of its own (a system call each, on
    the event loop) cost more than the line's rendering. Lines gathered while the loop runs
    are written together at the end of that turn (`call_soon`), so a kill loses at most what
    one turn logged. With no running loop (the CLI, start-up, other threads) a line is
    written at once.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._parts: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()  # the spool thread may log while the loop flushes

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
            if self._scheduled:
                return len(text)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._scheduled = loop is not None
        if loop is None:
            self.flush_now()
        else:
            loop.call_soon(self.flush_now)
        return len(text)

    def flush(self) -> None:
        """Nothing to do now: a pending batch is written at the end of the loop's turn."""

    def flush_now(self) -> None:
        """Write what is gathered (also at exit, for a batch whose turn never came)."""
        with self._lock:
            parts, self._parts = self._parts, []
            self._scheduled = False
        if parts:
            # A closed or broken stdout must not take the daemon down; there is nowhere to say so.
            with contextlib.suppress(OSError, ValueError):
                self.out.write("".join(parts))
                self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()


_streams: list[_BatchedStream] = []


@atexit.register
def flush_logs() -> None:
    """Write every log line still gathered (the daemon calls it as it stops; atexit too)."""
    for stream in _streams:
        stream.flush_now()


class _Timestamp:
    """`timestamp` as structlog's `TimeStamper(fmt="iso", utc=True)` writes it, in a fifth of
    the time: the date and time of day are formatted once a second, not once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


_timestamp = _Timestamp()


class _LevelGate:
    """Drops lines below a level that a reload may change (cached loggers cannot be rebuilt)."""

    def __init__(self) -> None:
        self.levelno = logging.INFO

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if LEVELS.get(method, logging.ERROR) < self.levelno:
            raise structlog.DropEvent
        return event_dict


_gate = _LevelGate()
_redactor = Redactor()


def _scrub_message(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A stdlib record's `event` is its message, free text (aiohttp's): scrubbed like a value."""
    if _redactor.secrets and "event" in event_dict:
        event_dict["event"] = _redactor.scrub(event_dict["event"])
    return event_dict


def set_log_level(level: str) -> None:
    """Change the level of every logger now (a config reload)."""
    levelno = LEVELS.get(level, logging.INFO)
    _gate.levelno = levelno
    logging.getLogger().setLevel(levelno)


def set_secrets(secrets: Iterable[str]) -> None:
    """Replace the values redacted from every log line (a reload may bring new keys)."""
    _redactor.secrets = _forms(secrets)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """JSON lines to stdout for journald, or console output on a TTY; stdlib logs go the same way.

    Our own loggers write straight to the stream (no stdlib detour: that is the cheap path,
    structlog's performance guide); aiohttp's stdlib records are rendered by the same processors.
    """
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    flush_logs()  # what the previous configuration gathered goes out first
    batched = _BatchedStream(out)
    _streams[:] = [batched]
    set_secrets(secrets)
    redact = _redactor
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=out.isatty())
        # The traceback must pass the redactor too, so format it before redaction.
        tail: list[Any] = [redact, renderer]
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
        tail = [structlog.processors.format_exc_info, redact, renderer]
    shared: list[Any] = [
        _gate,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    levelno = LEVELS.get(level, logging.INFO)
    _gate.levelno = levelno
    structlog.configure(
        processors=[*shared, *tail],
        # Debug lines are filtered by the gate, not here, so a reload can turn them on.
        wrapper_class=structlog.make_filtering_bound_logger(min(levelno, logging.DEBUG)),
        logger_factory=structlog.WriteLoggerFactory(batched),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(batched)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _scrub_message,
                *tail,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levelno)
    # One line per request would drown the per-event outcome lines; errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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
