"""The dispatcher: one delivery lane per account, each deciding its events' fates.

A lane pulls its account's events from the shared queue (which holds back later events of a
recipient while one is in delivery), and sends each under its account's flow control: the
circuit breaker and the refused-key gate, the rate limiter, and the concurrency limit (see
`flow/limiter.py`). It is the only place that decides what happens to an event after an attempt:
delivered, retried (by the tenacity policy in `retry.py`), or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from prometheus_client import Histogram
from tenacity import RetryCallState

from forwarder.config.schema import RemoteConfig, RetryConfig
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.delivery.flow.limiter import (
    BreakerState,
    CircuitBreaker,
    ConcurrencyController,
    RateLimiter,
    Ticket,
)
from forwarder.delivery.remote import Result, Verdict
from forwarder.delivery.retry import run_with_retries
from forwarder.events import Event
from forwarder.ops.systemd import PerMinute
from forwarder.ops.telemetry import Stats
from forwarder.storage.eventstatus import Outcome, StatusBook
from forwarder.storage.queue import EventQueue

log = structlog.get_logger("forwarder.dispatcher")

Sleep = Callable[[float], Awaitable[None]]
# Longest single wait on a gate or the limiter: a reload or a stop is noticed within it.
MAX_WAIT_SLICE_S = 1.0


class Sender(Protocol):
    """What a lane needs of the remote client."""

    async def send(self, event: Event) -> Result: ...


class Outcomes(Protocol):
    """Where a settled event goes: its spool row removed, or into the dead letters."""

    def delivered(self, event: Event, spool_seq: int) -> None: ...

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None: ...


@dataclass(slots=True)
class _Tally:
    """One event's delivery so far: its attempts, and whether it holds a concurrency slot."""

    attempts: int = 0
    first_at: float = 0.0  # time.time() of the first attempt
    holding: bool = True  # the pump handed over a slot; given back while in backoff
    next_at: float | None = None  # time.time() of the next attempt while in backoff


@dataclass(frozen=True, slots=True)
class LaneSettings:
    """The reloadable settings of one account's lane."""

    per_minute: int
    remote: RemoteConfig
    retry: RetryConfig


class Lane:
    """Delivery for one account: its sender, rate limiter, concurrency, breaker and key gate."""

    def __init__(
        self,
        name: str,
        queue: EventQueue,
        sender: Sender,
        settings: LaneSettings,
        *,
        outcomes: Outcomes,
        stats: Stats,
        latency: Histogram | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        status: StatusBook | None = None,
    ) -> None:
        self.name = name
        self._status = status
        self.sender = sender
        self._queue = queue
        self._outcomes = outcomes
        self._stats = stats
        self._latency = latency.labels(account=name) if latency is not None else None
        self._sleep = sleep
        self._clock = clock
        remote = settings.remote
        self.limiter = RateLimiter(settings.per_minute, clock=clock)
        self.concurrency = ConcurrencyController(
            minimum=remote.min_concurrency,
            maximum=remote.max_concurrency,
            fixed=remote.concurrency,
            clock=clock,
        )
        self.breaker = CircuitBreaker(
            failures=remote.breaker_failures,
            probe_initial_s=remote.breaker_probe_initial_s,
            probe_max_s=remote.breaker_probe_max_s,
            clock=clock,
        )
        # A refused key is true for every event: one failure closes the gate, one probe reopens.
        self.auth = CircuitBreaker(
            failures=1,
            probe_initial_s=remote.auth_retry_s,
            probe_max_s=remote.auth_retry_s,
            clock=clock,
        )
        self.settings = settings
        self._limiter_lock = asyncio.Lock()
        self._gates_changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._waiting_for_slot = False  # the pump holds an event until a slot frees up
        # Called after every outcome (the dispatcher's drain and housekeeping listen).
        self.on_outcome: Callable[[], None] = lambda: None
        self.retired = False
        self.delivered = 0
        # Sampled by the daemon every few seconds and by each view: delivered per minute.
        self.delivered_rate = PerMinute(clock=clock)
        self.delivered_rate.observe(0)  # from the lane's start, so the first figure is real
        self.auth_reason = ""

    # --- state --------------------------------------------------------------------------------

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
        if self.auth.is_open:
            return f"account {self.name}: delivery paused: {self.auth_reason}"
        if self.breaker.is_open:
            return (
                f"account {self.name}: circuit breaker open after "
                f"{self.breaker.consecutive} consecutive failures (last: {self.breaker.last_error})"
            )
        return ""

    def view(self) -> dict[str, Any]:
        """This lane's state for /v1/stats and the metrics."""
        return {
            "queued": self._queue.depth(self.name),
            "in_delivery": self.in_delivery,
            "delivered": self.delivered,
            "delivered_per_min": round(self.delivered_rate.observe(self.delivered), 1),
            "rate_limit": {
                "limit_per_window": self.limiter.limit,
                "window_s": self.limiter.window_s,
                "remaining": self.limiter.remaining,
                "tokens": round(self.limiter.tokens, 3),
                "rate_limited": self.limiter.rate_limited,
                # Seconds left of a pause a 429 imposed on the whole account (0: none).
                "paused_for_s": round(max(0.0, self.limiter.gate_until - self._clock()), 3),
            },
            "concurrency": {
                "limit": self.concurrency.limit,
                "adaptive": self.concurrency.adaptive,
                "min": self.concurrency.minimum,
                "max": self.concurrency.maximum,
                "sending": self.concurrency.sending,
                "rtt_ms": round(self.concurrency.past_rtt * 1000, 1),
            },
            "breaker": {
                "state": self.breaker.state.value,
                "consecutive_failures": self.breaker.consecutive,
                "opened": self.breaker.opened,
                "probe_interval_s": self.breaker.interval_s,
            },
            "paused": self.auth.is_open,
            "pause_reason": self.auth_reason if self.auth.is_open else "",
            "retired": self.retired,
        }

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start pulling this account's events."""
        self._pump = asyncio.create_task(self._run_pump(), name=f"lane-{self.name}")

    def configure(self, settings: LaneSettings, sender: Sender | None = None) -> None:
        """Apply reloaded settings; events in delivery carry on, later attempts see them."""
        remote = settings.remote
        self.limiter.relearn_window()  # a window length learned wrongly is corrected by a reload
        if settings.per_minute != self.settings.per_minute:
            self.limiter.set_per_minute(settings.per_minute)
        self.concurrency.configure(
            minimum=remote.min_concurrency, maximum=remote.max_concurrency, fixed=remote.concurrency
        )
        self.breaker.configure(
            failures=remote.breaker_failures,
            probe_initial_s=remote.breaker_probe_initial_s,
            probe_max_s=remote.breaker_probe_max_s,
        )
        self.auth.configure(
            failures=1, probe_initial_s=remote.auth_retry_s, probe_max_s=remote.auth_retry_s
        )
        if sender is not None:
            self.sender = sender
        self.settings = settings
        self._notify_gates()

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
        tally = _Tally()
        status = self._status
        if status is not None:
            status.delivering(event, tally)
        remote_id: object = None
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
            dead = self._finish(event, result, tally.attempts, tally.first_at)
            remote_id = result.remote_id
        except Exception as exc:  # a bug, not the remote: keep the event, keep the lane
            log.exception("internal_error", event_id=event.event_id, account=self.name)
            dead = self._dead_letter("internal_error", None, repr(exc), tally.attempts, time.time())
        except asyncio.CancelledError:
            if status is not None:  # the queue keeps the event: queued again, not in delivery
                status.settled(event, 0, None)
            raise
        finally:
            if tally.holding:
                self.concurrency.release()
        # Reached only with an outcome; a cancelled delivery stays in the queue's care.
        spool_seq = self._queue.done(event)
        if status is not None:
            status.settled(event, spool_seq, _outcome(event, self.name, tally, dead, remote_id))
        if dead is None:
            self._outcomes.delivered(event, spool_seq)
        else:
            self._outcomes.dead_lettered(event, spool_seq, dead)
        self.on_outcome()

    async def _retry(self, event: Event, tally: _Tally, first: Result, spent_s: float) -> Result:
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
            before_sleep=self._log_retry,
            sleep=backoff,
        )

    async def _attempt(self, event: Event, tally: _Tally) -> Result:
        """One attempt through the gates, the rate limiter and the remote; learns from it."""
        if self.auth.state is BreakerState.CLOSED and self.breaker.state is BreakerState.CLOSED:
            auth_probe = breaker_probe = False  # `_pass_gates` without a coroutine
        else:
            auth_probe, breaker_probe = await self._pass_gates()
        try:
            # The limiter's lock only orders waiters: with none, take a token at once.
            ticket = self.limiter.reserve() if not self._limiter_lock.locked() else None
            if not isinstance(ticket, Ticket):
                ticket = await self._take_token()
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
            if auth_probe:
                self.auth.abandon()
            if breaker_probe:
                self.breaker.abandon()
            raise
        self._learn(ticket, result, auth_probe=auth_probe, breaker_probe=breaker_probe)
        return result

    async def _pass_gates(self) -> tuple[bool, bool]:
        """Wait until the key gate and the breaker let an attempt through; say if it probes."""
        while True:
            auth_was_open = self.auth.is_open
            auth = self.auth.permit()
            if auth is True:
                breaker_was_open = self.breaker.is_open
                breaker = self.breaker.permit()
                if breaker is True:
                    return auth_was_open, breaker_was_open
                if auth_was_open:
                    self.auth.abandon()
                wait = float(breaker)
            else:
                wait = float(auth)
            await self._wait_gates(wait)

    async def _wait_gates(self, seconds: float) -> None:
        changed = self._gates_changed
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event is set, and a stop must never be lost.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, MAX_WAIT_SLICE_S)):
                await changed.wait()

    def _notify_gates(self) -> None:
        self._gates_changed.set()
        self._gates_changed = asyncio.Event()

    async def _take_token(self) -> Ticket:
        # One waiter at a time, in arrival order: the limiter hands out tokens fairly.
        async with self._limiter_lock:
            while True:
                reserved = self.limiter.reserve()
                if isinstance(reserved, Ticket):
                    return reserved
                await self._sleep(min(reserved, MAX_WAIT_SLICE_S))

    def _learn(
        self, ticket: Ticket, result: Result, *, auth_probe: bool, breaker_probe: bool
    ) -> None:
        if self._latency is not None and result.status is not None:
            self._latency.observe(result.latency_s)
        self.limiter.observe(
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
                wait_s=round(max(self.limiter.gate_until - time.monotonic(), 0.0), 3),
                limit=result.rate_limit,
            )
        if result.verdict is Verdict.AUTH:
            self._stats.auth_failures += 1
            self.auth_reason = f"remote refused the API key (HTTP {result.status}): {result.error}"
            self._stats.note_error(self.name, self.auth_reason)
            if self.auth.failure(result.error, probe=auth_probe):
                log.error(
                    "delivery_paused",
                    status=result.status,
                    error=result.error,
                    probe_every_s=self.auth.interval_s,
                )
            return
        if self.auth.success():
            log.info("delivery_resumed")
            self._notify_gates()
        if result.transient_failure:
            self._stats.note_error(self.name, result.error)
            if self.breaker.failure(result.error, probe=breaker_probe):
                # Logged when it opens; a failed probe only says when the next one goes.
                if not breaker_probe:
                    # When the remote comes back, sending ramps up again from low.
                    self.concurrency.restart()
                line = log.warning if breaker_probe else log.error
                line(
                    "breaker_probe_failed" if breaker_probe else "breaker_open",
                    consecutive_failures=self.breaker.consecutive,
                    error=result.error,
                    probe_in_s=self.breaker.interval_s,
                )
        elif self.breaker.success():
            log.info("breaker_closed", outage_s=round(time.monotonic() - self.breaker.opened_at, 1))
            self._notify_gates()

    # --- outcomes -----------------------------------------------------------------------------

    def _finish(
        self, event: Event, result: Result, attempts: int, first_at: float
    ) -> DeadLetterNote | None:
        """Count and log the outcome; the dead-letter note when the event did not make it."""
        latency_ms = round(result.latency_s * 1000, 1)
        if result.verdict is Verdict.DELIVERED:
            self._stats.delivered += 1
            self.delivered += 1
            if result.duplicate:
                self._stats.duplicates += 1
            line = log.warning if result.warning else log.info
            line(
                "delivered",
                attempt=attempts,
                status=result.status,
                remote_id=result.remote_id,
                duplicate=result.duplicate,
                latency_ms=latency_ms,
                age_ms=round((time.time() - event.accepted_at) * 1000, 1),
                **({"warning": result.warning} if result.warning else {}),
            )
            return None
        if result.verdict is Verdict.PERMANENT:
            reason, error = result.reason or "rejected", result.error
        else:
            elapsed = time.time() - first_at
            reason = "gave_up"
            error = f"gave up after {attempts} attempts in {elapsed:.0f}s; last: {result.error}"
        log.error(
            "dead_lettered",
            reason=reason,
            attempt=attempts,
            status=result.status,
            error=error,
            latency_ms=latency_ms,
        )
        return self._dead_letter(reason, result.status, error, attempts, first_at)

    def _dead_letter(
        self, reason: str, status: int | None, error: str, attempts: int, first_at: float
    ) -> DeadLetterNote:
        self._stats.dead_lettered[reason] += 1
        self._stats.note_error(self.name, f"dead-lettered ({reason}): {error}")
        return DeadLetterNote(
            reason=reason,
            status=status,
            error=error,
            attempts=attempts,
            first_attempt_at=first_at,
            last_attempt_at=time.time(),
        )

    def _log_retry(self, state: RetryCallState) -> None:
        self._stats.retries += 1
        # Only RETRY results are retried (exceptions are not), so the outcome is always a Result.
        assert state.outcome is not None
        result = state.outcome.result()
        assert isinstance(result, Result)
        log.warning(
            "retrying",
            attempt=state.attempt_number,
            status=result.status,
            error=result.error,
            latency_ms=round(result.latency_s * 1000, 1),
            wait_s=round(state.upcoming_sleep, 3),
        )


def _outcome(
    event: Event, account: str, tally: _Tally, dead: DeadLetterNote | None, remote_id: object
) -> Outcome:
    if dead is None:
        return Outcome(
            "delivered", event.event_id, event.number, account, tally.attempts, time.time(),
            remote_id,
        )  # fmt: skip
    return Outcome(
        "dead_lettered", event.event_id, event.number, account, dead.attempts,
        dead.last_attempt_at, None, dead.reason, dead.status, dead.error,
    )  # fmt: skip


class Dispatcher:
    """The lanes of all accounts over one queue: start, reconfigure, drain and stop them."""

    def __init__(
        self,
        queue: EventQueue,
        *,
        outcomes: Outcomes,
        stats: Stats,
        latency: Histogram | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        status: StatusBook | None = None,
    ) -> None:
        self._queue = queue
        self._outcomes = outcomes
        self._status = status
        self._stats = stats
        self._latency = latency
        self._sleep = sleep
        self._clock = clock
        self.lanes: dict[str, Lane] = {}
        self._started = False
        self._progress = asyncio.Event()
        self._reaping: set[asyncio.Task[None]] = set()

    @property
    def in_delivery(self) -> int:
        """Events in delivery across all lanes."""
        return sum(lane.in_delivery for lane in self.lanes.values())

    def healthy(self) -> bool:
        """Every lane's pump is still running (a dead one would leave its events stranded)."""
        return all(lane.pumping for lane in self.lanes.values())

    def not_ready_reason(self) -> str:
        """Why some account cannot deliver, or ""."""
        reasons = [lane.not_ready_reason() for lane in self.lanes.values() if not lane.retired]
        return "; ".join(r for r in reasons if r)

    def add(self, name: str, sender: Sender, settings: LaneSettings) -> Lane:
        """Add an account's lane (started at once if the dispatcher runs)."""
        lane = Lane(
            name,
            self._queue,
            sender,
            settings,
            outcomes=self._outcomes,
            stats=self._stats,
            latency=self._latency,
            sleep=self._sleep,
            clock=self._clock,
            status=self._status,
        )
        lane.on_outcome = self._on_outcome
        self.lanes[name] = lane
        if self._started:
            lane.start()
        return lane

    def retire(self, name: str) -> None:
        """An account left the configuration: it delivers what it holds, then its lane stops."""
        lane = self.lanes.get(name)
        if lane is not None:
            lane.retired = True
            self._reap()

    def _reap(self) -> None:
        for name, lane in list(self.lanes.items()):
            if lane.retired and lane.idle:
                del self.lanes[name]
                task = asyncio.create_task(lane.stop(), name=f"lane-stop-{name}")
                self._reaping.add(task)
                task.add_done_callback(self._reaping.discard)

    def _on_outcome(self) -> None:
        self._progress.set()
        self._reap()

    def start(self) -> None:
        """Start every lane."""
        self._started = True
        for lane in self.lanes.values():
            lane.start()

    async def drain(self, timeout: float, force: asyncio.Event) -> bool:
        """Keep delivering until nothing is queued or in delivery, `timeout` passes or `force`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._deliverable():
            remaining = deadline - loop.time()
            if remaining <= 0 or force.is_set():
                return False
            self._progress.clear()
            # Short slices so a second signal (force) is noticed promptly.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self._progress.wait()
        return True

    def _deliverable(self) -> bool:
        # Events of accounts without a lane (a removed account, a client key not presented
        # since a restart) cannot drain: they are saved at stop, not waited for.
        return any(self._queue.depth(name) or lane.in_delivery for name, lane in self.lanes.items())

    async def stop(self) -> list[tuple[Event, int]]:
        """Stop every lane; return every event not delivered (with its spool row, 0 if none),
        those in delivery first."""
        lanes = list(self.lanes.values())
        await asyncio.gather(*(lane.stop() for lane in lanes), *self._reaping)
        self._started = False
        return self._queue.take_all_spooled()
