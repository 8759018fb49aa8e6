"""What intake's handlers share: `IntakeState`, kept on the application under `STATE`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from forwarder.intake.accounts import Accounts
from forwarder.ops.credentials import Secret
from forwarder.ops.logthrottle import LogThrottle
from forwarder.ops.metrics import Metrics, Stats
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.log import EventLog
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import EventQueue


@dataclass(slots=True)
class IntakeState:
    """What the handlers need: the queue, the counters and the daemon's condition."""

    queue: EventQueue
    stats: Stats
    metrics: Metrics
    max_batch: int
    max_body_bytes: int
    accepting: bool = True
    # Routes events to accounts; None leaves every event on the default account ("").
    accounts: Accounts | None = None
    # Where accepted events go (storage/log.py); None: straight into the queue.
    log: EventLog | None = None
    # Returns "" when ready, or why not (delivery paused, shutting down).
    not_ready_reason: Callable[[], str] = field(default=lambda: "")
    stats_extra: Callable[[], dict[str, Any]] = field(default=dict)
    # What /readyz adds to its answer (the fleet mode); {} without a fleet.
    ready_detail: Callable[[], dict[str, Any]] = field(default=dict)
    # The token every request but GET /healthz must carry; None: no token required.
    auth_token: Secret | None = None
    # A request's body must arrive within this long of its head (intake.body_timeout_s).
    body_timeout_s: float = 30.0
    # Every log line intake can write once per request goes through it (ops/logthrottle.py).
    throttle: LogThrottle = field(default_factory=LogThrottle)
    # intake.drop_in_answer: "remote" (200, data = the event number) or "accepted" (202).
    drop_in_answer: str = "remote"
    # The event numbers intake gives (the log's `intake_numbers`; None: the log numbers them).
    numbers: EventNumbers | None = None
    # What became of events, for GET /v1/events/{id}; None: the route answers 404.
    status: StatusBook | None = None


STATE = web.AppKey("state", IntakeState)
