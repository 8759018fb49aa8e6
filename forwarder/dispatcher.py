"""The dispatcher: workers that take events from the queue and decide each one's fate.

It is the only place that decides what happens to an event after an attempt: delivered, retried
(by the tenacity policy in `retry.py`), dead-lettered, or held while delivery is paused because
the remote refuses the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
from prometheus_client import Histogram
from tenacity import RetryCallState

from forwarder.config import RetryConfig
from forwarder.deadletter import DeadLetterWriter, dead_letter_record
from forwarder.events import Event
from forwarder.queue import EventQueue
from forwarder.remote import Result, Verdict
from forwarder.retry import build_retrying
from forwarder.telemetry import Stats

log = structlog.get_logger("forwarder.dispatcher")


class Sender(Protocol):
    """What the dispatcher needs of the remote client."""

    async def send(self, event: Event) -> Result: ...


class Dispatcher:
    """`concurrency` workers over one queue and one sender."""

    def __init__(
        self,
        queue: EventQueue,
        sender: Sender,
        retry: RetryConfig,
        *,
        concurrency: int,
        auth_retry_s: float,
        dead_letters: DeadLetterWriter,
        stats: Stats,
        latency: Histogram | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._queue = queue
        self._sender = sender
        self._retry = retry
        self._concurrency = concurrency
        self._auth_retry_s = auth_retry_s
        self._dead_letters = dead_letters
        self._stats = stats
        self._latency = latency
        self._sleep = sleep
        self._workers: list[asyncio.Task[None]] = []
        # Keyed by worker number: two in-flight events may share an event_id (an app resent it).
        self._in_flight: dict[int, Event] = {}
        self._progress = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._prober: asyncio.Task[object] | None = None
        self.pause_reason = ""

    @property
    def paused(self) -> bool:
        """True while delivery is held because the remote refuses the API key."""
        return not self._resumed.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def workers_alive(self) -> int:
        return sum(1 for task in self._workers if not task.done())

    def start(self) -> None:
        """Start the workers."""
        self._workers = [
            asyncio.create_task(self._work(n), name=f"delivery-worker-{n}")
            for n in range(self._concurrency)
        ]

    async def drain(self, timeout: float, force: asyncio.Event) -> bool:
        """Keep delivering until queue and workers are empty, `timeout` passes or `force` is set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._queue) or self._in_flight:
            remaining = deadline - loop.time()
            if remaining <= 0 or force.is_set():
                return False
            self._progress.clear()
            # Short slices so a second signal (force) is noticed promptly.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), timeout=min(remaining, 0.1))
        return True

    async def stop(self) -> list[Event]:
        """Cancel the workers; return every event not delivered, in-flight ones first."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        leftovers = [self._in_flight[n] for n in sorted(self._in_flight)]
        self._in_flight.clear()
        return leftovers + self._queue.take_all()

    async def _work(self, number: int) -> None:
        while True:
            await self._resumed.wait()  # while paused, queued events stay queued
            event = await self._queue.get()
            self._in_flight[number] = event
            try:
                await self._deliver(event)
            except Exception as exc:  # a bug, not the remote: keep the event, keep the worker
                log.exception("internal_error", event_id=event.event_id)
                self._dead_letter(event, "internal_error", None, repr(exc), 0, time.time())
            # Reached only when the event has its outcome; on cancellation it stays in flight,
            # so `stop` hands it back for saving.
            del self._in_flight[number]
            self._progress.set()

    async def _deliver(self, event: Event) -> None:
        attempts = 0
        first_at = 0.0
        with structlog.contextvars.bound_contextvars(
            event_id=event.event_id, recipient_id=event.recipient_id, name=event.name
        ):

            async def attempt() -> Result:
                nonlocal attempts, first_at
                attempts += 1
                if attempts == 1:
                    first_at = time.time()
                self._stats.attempts += 1
                result = await self._sender.send(event)
                if self._latency is not None:
                    self._latency.observe(result.latency_s)
                return result

            while True:
                retrying = build_retrying(
                    self._retry, before_sleep=self._log_retry, sleep=self._sleep
                )
                result: Result = await retrying(attempt)
                if result.verdict is not Verdict.AUTH:
                    break
                await self._hold_for_auth(result)
            self._resume()
            self._finish(event, result, attempts, first_at)

    def _finish(self, event: Event, result: Result, attempts: int, first_at: float) -> None:
        latency_ms = round(result.latency_s * 1000, 1)
        if result.verdict is Verdict.DELIVERED:
            self._stats.delivered += 1
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
            return
        if result.verdict is Verdict.PERMANENT:
            reason, error = "rejected", result.error
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
        self._dead_letter(event, reason, result.status, error, attempts, first_at)

    def _dead_letter(
        self,
        event: Event,
        reason: str,
        status: int | None,
        error: str,
        attempts: int,
        first_at: float,
    ) -> None:
        self._stats.dead_lettered[reason] += 1
        self._dead_letters.add(
            dead_letter_record(
                event,
                reason=reason,
                status=status,
                error=error,
                attempts=attempts,
                first_attempt_at=first_at,
                last_attempt_at=time.time(),
            )
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

    async def _hold_for_auth(self, result: Result) -> None:
        """401/403: the key is bad for every event. Pause all, probe with this one event."""
        self._stats.auth_failures += 1
        me = asyncio.current_task()
        if not self.paused:
            self._resumed.clear()
            self._prober = me
            self.pause_reason = f"remote refused the API key (HTTP {result.status}): {result.error}"
            log.error(
                "delivery_paused",
                status=result.status,
                error=result.error,
                probe_every_s=self._auth_retry_s,
            )
        if self._prober is me:
            await self._sleep(self._auth_retry_s)
            return
        # Other workers hold their events until the prober sees the key accepted again.
        while self.paused:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resumed.wait(), timeout=self._auth_retry_s)

    def _resume(self) -> None:
        if self.paused and self._prober is asyncio.current_task():
            self._prober = None
            self.pause_reason = ""
            self._resumed.set()
            log.info("delivery_resumed")
