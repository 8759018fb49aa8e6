"""One account's lane: the pump that takes its events from the queue, and their delivery.

A lane is handed its rate budget (`flow/budget.py`); it builds its concurrency controller, its
`Gates` (breaker, refused-key gate, probes: `gates.py`) and its `OutcomeRecorder` (counts, log
lines, dead-letter notes, status: `outcomes.py`). What stays here is the order of an attempt
(gates → budget → slot → the request) and the decision after it: delivered, retried (by the
tenacity policy in `retry.py`), or dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from prometheus_client import Histogram

from forwarder.config.schema import RemoteConfig, RetryConfig
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.delivery.flow.breaker import CircuitBreaker
from forwarder.delivery.flow.budget import RateBudget, Sleep
from forwarder.delivery.flow.concurrency import ConcurrencyController
from forwarder.delivery.flow.ratelimit import Ticket
from forwarder.delivery.gates import Gates, Pass
from forwarder.delivery.outcomes import OutcomeRecorder, Outcomes, Tally
from forwarder.delivery.remote import Result, Verdict
from forwarder.delivery.retry import run_with_retries
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.ops.systemd import PerMinute
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.queue import EventQueue

log = structlog.get_logger("forwarder.dispatcher")


class Sender(Protocol):
    """What a lane needs of the remote client."""

    async def send(self, event: Event) -> Result: ...


@dataclass(frozen=True, slots=True)
class LaneSettings:
    """The reloadable settings of one account's lane."""

    per_minute: int
    remote: RemoteConfig
    retry: RetryConfig


class Lane:
    """Delivery for one account: its pump, and each event's attempts under flow control."""

    def __init__(
        self,
        name: str,
        queue: EventQueue,
        sender: Sender,
        settings: LaneSettings,
        *,
        budget: RateBudget,
        outcomes: Outcomes,
        stats: Stats,
        latency: Histogram | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        status: StatusBook | None = None,
    ) -> None:
        self.name = name
        self.sender = sender
        self._queue = queue
        self._stats = stats
        self._latency = latency.labels(account=name) if latency is not None else None
        self._sleep = sleep
        self.budget = budget
        remote = settings.remote
        self.concurrency = ConcurrencyController(
            minimum=remote.min_concurrency,
            maximum=remote.max_concurrency,
            fixed=remote.concurrency,
            clock=clock,
        )
        self.gates = Gates(name, remote, stats=stats, clock=clock)
        self.record = OutcomeRecorder(name, outcomes, stats=stats, status=status)
        self.settings = settings
        self._pump: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._waiting_for_slot = False  # the pump holds an event until a slot frees up
        # Called after every outcome (the dispatcher's drain and housekeeping listen).
        self.on_outcome: Callable[[], None] = lambda: None
        self.retired = False
        # Sampled by the daemon every few seconds and by each view: delivered per minute.
        self.delivered_rate = PerMinute(clock=clock)
        self.delivered_rate.observe(0)  # from the lane's start, so the first figure is real

    # --- state --------------------------------------------------------------------------------

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker (in the gates)."""
        return self.gates.breaker

    @property
    def auth(self) -> CircuitBreaker:
        """The refused-key gate (in the gates)."""
        return self.gates.auth

    @property
    def delivered(self) -> int:
        """Events of this account delivered since the lane started."""
        return self.record.delivered

    @property
    def in_delivery(self) -> int:
        """Events taken from the queue whose outcome is not known yet."""
        return len(self._deliveries) + int(self._waiting_for_slot)

    @property
    def pumping(self) -> bool:
        """False once the pump task has ended (it ends only on a stop, or by a bug)."""
        return self._pump is None or not self._pump.done()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in delivery."""
        return not self.in_delivery and not self._queue.depth(self.name)

    def not_ready_reason(self) -> str:
        """Why this account cannot deliver now, or ""."""
        return self.gates.not_ready_reason()

    def view(self) -> dict[str, Any]:
        """This lane's state for /v1/stats and the metrics."""
        delivered = self.record.delivered
        return {
            "queued": self._queue.depth(self.name),
            "in_delivery": self.in_delivery,
            "delivered": delivered,
            "delivered_per_min": round(self.delivered_rate.observe(delivered), 1),
            "rate_limit": self.budget.view(),
            "concurrency": {
                "limit": self.concurrency.limit,
                "adaptive": self.concurrency.adaptive,
                "min": self.concurrency.minimum,
                "max": self.concurrency.maximum,
                "sending": self.concurrency.sending,
                "rtt_ms": round(self.concurrency.past_rtt * 1000, 1),
            },
            **self.gates.view(),
            "retired": self.retired,
        }

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start pulling this account's events."""
        self._pump = asyncio.create_task(self._run_pump(), name=f"lane-{self.name}")

    def configure(self, settings: LaneSettings, sender: Sender | None = None) -> None:
        """Apply reloaded settings; events in delivery carry on, later attempts see them."""
        remote = settings.remote
        self.budget.relearn_window()  # a window length learned wrongly is corrected by a reload
        if settings.per_minute != self.settings.per_minute:
            self.budget.set_per_minute(settings.per_minute)
        self.concurrency.configure(
            minimum=remote.min_concurrency, maximum=remote.max_concurrency, fixed=remote.concurrency
        )
        if sender is not None:
            self.sender = sender
        self.settings = settings
        self.gates.configure(remote)

    async def stop(self) -> None:
        """Cancel the pump and every delivery; their events stay in the queue's care."""
        tasks = [t for t in (self._pump, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pump = None
        self._deliveries.clear()
        self._waiting_for_slot = False

    async def _run_pump(self) -> None:
        while True:
            # The event first, then a slot. Never the other way round: a pump holding a slot
            # while it waits for an event (all ready recipients busy) could starve the very
            # retry that would free the recipient: a deadlock at a concurrency of one.
            event = await self._queue.get(self.name)
            self._waiting_for_slot = True
            await self.concurrency.acquire()  # cancelled here: the queue still has the event
            self._waiting_for_slot = False
            task = asyncio.create_task(self._deliver(event), name=f"deliver-{self.name}")
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    # --- one event ----------------------------------------------------------------------------

    async def _deliver(self, event: Event) -> None:
        tally = Tally()
        record = self.record
        record.started(event, tally)
        remote_id: object = None
        dead: DeadLetterNote | None
        # This task runs in a copy of the pump's context: what is bound here stays with this
        # event's log lines and goes with the task, so there is nothing to unbind.
        structlog.contextvars.bind_contextvars(
            event_id=event.event_id,
            recipient_id=event.recipient_id,
            name=event.name,
            account=self.name,
        )
        try:
            # The first attempt is awaited here, not through tenacity: most events are
            # delivered by it, and every await level between this task and the HTTP client is
            # passed again each time the request resumes.
            started = time.monotonic()
            result = await self._attempt(event, tally)
            while True:
                if result.verdict is Verdict.RETRY:
                    result = await self._retry(event, tally, result, time.monotonic() - started)
                if result.verdict is not Verdict.AUTH:
                    break
                # The key is refused: the gate holds this event with all others; the
                # give-up clock restarts, since the event itself is not at fault.
                started = time.monotonic()
                result = await self._attempt(event, tally)
            dead = record.finish(event, result, tally)
            remote_id = result.remote_id
        except Exception as exc:  # a bug, not the remote: keep the event, keep the lane
            dead = record.internal_error(event, exc, tally)
        except asyncio.CancelledError:
            record.cancelled(event)  # the queue keeps the event: queued again
            raise
        finally:
            if tally.holding:
                self.concurrency.release()
        # Reached only with an outcome; a cancelled delivery stays in the queue's care.
        spool_seq = self._queue.done(event)
        record.settle(event, spool_seq, tally, dead, remote_id)
        self.on_outcome()

    async def _retry(self, event: Event, tally: Tally, first: Result, spent_s: float) -> Result:
        """After a first answer that asks for a retry: the tenacity policy takes over."""

        async def attempt() -> Result:
            return await self._attempt(event, tally)

        async def backoff(seconds: float) -> None:
            # A retrying event gives its slot back while it waits, so other recipients flow.
            self.concurrency.release()
            tally.holding = False
            tally.next_at = time.time() + seconds
            await self._sleep(seconds)
            tally.next_at = None
            await self.concurrency.acquire()
            tally.holding = True

        return await run_with_retries(
            attempt,
            self.settings.retry,
            first=first,
            spent_s=spent_s,
            before_sleep=self.record.log_retry,
            sleep=backoff,
        )

    async def _attempt(self, event: Event, tally: Tally) -> Result:
        """One attempt through the gates, the rate budget and the remote; learns from it."""
        gates = self.gates
        # Gates closed and the budget's tokens at hand: no coroutine on the way to the request.
        gate_pass = gates.try_pass()
        if gate_pass is None:
            gate_pass = await gates.wait_pass()
        try:
            ticket = self.budget.try_acquire()
            if not isinstance(ticket, Ticket):
                ticket = await self.budget.acquire()
            tally.attempts += 1
            if tally.attempts == 1:
                tally.first_at = time.time()
            self._stats.attempts += 1
            self.concurrency.request_started()
            sent: Result | None = None
            try:
                sent = await self.sender.send(event)
            finally:
                # Cancelled mid-request: the request is gone, and so must its count be.
                self.concurrency.request_finished(
                    sent.latency_s if sent else 0.0,
                    backpressure=bool(sent and sent.transient_failure),
                )
            result = sent
        except BaseException:
            gates.abandon(gate_pass)
            raise
        self._learn(ticket, gate_pass, result)
        return result

    def _learn(self, ticket: Ticket, gate_pass: Pass, result: Result) -> None:
        if self._latency is not None and result.status is not None:
            self._latency.observe(result.latency_s)
        self.budget.observe(
            ticket,
            limit=result.rate_limit,
            remaining=result.rate_remaining,
            reset_s=result.rate_reset_s,
            rate_limited=result.rate_limited,
            retry_after=result.retry_after,
        )
        if result.rate_limited:
            log.warning(
                "rate_limited",
                wait_s=round(max(self.budget.paused_until - time.monotonic(), 0.0), 3),
                limit=result.rate_limit,
            )
        if self.gates.learn(gate_pass, result):
            # The breaker opened: when the remote comes back, sending ramps up again from low.
            self.concurrency.restart()
