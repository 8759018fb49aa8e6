"""What a lane records of its events' fates: counts, log lines, dead-letter notes, status.

`OutcomeRecorder` is the lane's bookkeeping, apart from its delivery: it counts and logs each
outcome (and each retry), writes the dead-letter note of an event that did not make it, keeps
the status book (`GET /v1/events/{id}`) informed, and hands the settled event to the
`Outcomes` sink (the daemon: its spool row removed, or into the dead letters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog
from tenacity import RetryCallState

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.delivery.remote import Result, Verdict
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.storage.eventstatus import Outcome, StatusBook

log = structlog.get_logger("forwarder.dispatcher")


class Outcomes(Protocol):
    """Where a settled event goes: its spool row removed, or into the dead letters."""

    def delivered(self, event: Event, spool_seq: int) -> None: ...

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None: ...


@runtime_checkable
class Fence(Protocol):
    """An `Outcomes` sink that may take an event back before an attempt: a shared queue whose
    partition lease this host lost (forwarder/fleet/window.py). The lane then drops the event
    without an outcome; the host that holds the partition now delivers it."""

    def may_deliver(self, event: Event) -> bool: ...


class Fenced(Exception):
    """The event's partition is no longer this host's: no attempt, no outcome."""


@dataclass(slots=True)
class Tally:
    """One event's delivery so far: its attempts, and whether it holds a concurrency slot."""

    attempts: int = 0
    first_at: float = 0.0  # time.time() of the first attempt
    holding: bool = True  # the pump handed over a slot; given back while in backoff
    next_at: float | None = None  # time.time() of the next attempt while in backoff


class OutcomeRecorder:
    """Counting, logging, dead-letter notes and status hooks of one account's outcomes."""

    def __init__(
        self, name: str, sink: Outcomes, *, stats: Stats, status: StatusBook | None = None
    ) -> None:
        self._name = name
        self._sink = sink
        self._stats = stats
        self._status = status
        self.delivered = 0  # events of this account delivered

    def started(self, event: Event, tally: Tally) -> None:
        """The lane took `event` into delivery."""
        if self._status is not None:
            self._status.delivering(event, tally)

    def cancelled(self, event: Event) -> None:
        """A stop cancelled the delivery: the queue keeps the event (queued again)."""
        if self._status is not None:
            self._status.settled(event, 0, None)

    def finish(self, event: Event, result: Result, tally: Tally) -> DeadLetterNote | None:
        """Count and log the outcome; the dead-letter note when the event did not make it."""
        attempts = tally.attempts
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
            elapsed = time.time() - tally.first_at
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
        return self._dead_letter(reason, result.status, error, attempts, tally.first_at)

    def internal_error(self, event: Event, exc: Exception, tally: Tally) -> DeadLetterNote:
        """A bug, not the remote: logged with its traceback, and the event dead-lettered."""
        log.exception("internal_error", event_id=event.event_id, account=self._name)
        return self._dead_letter("internal_error", None, repr(exc), tally.attempts, time.time())

    def settle(
        self,
        event: Event,
        spool_seq: int,
        tally: Tally,
        dead: DeadLetterNote | None,
        remote_id: object,
    ) -> None:
        """The event left the queue: tell the status book and the sink."""
        status = self._status
        if status is not None:
            # Built here, not by a helper: this runs once per delivered event.
            if dead is None:
                outcome = Outcome(
                    "delivered", event.event_id, event.number, self._name, tally.attempts,
                    time.time(), remote_id,
                )  # fmt: skip
            else:
                outcome = Outcome(
                    "dead_lettered", event.event_id, event.number, self._name, dead.attempts,
                    dead.last_attempt_at, None, dead.reason, dead.status, dead.error,
                )  # fmt: skip
            status.settled(event, spool_seq, outcome)
        if dead is None:
            self._sink.delivered(event, spool_seq)
        else:
            self._sink.dead_lettered(event, spool_seq, dead)

    def log_retry(self, state: RetryCallState) -> None:
        """Count and log a retry (tenacity's before-sleep hook)."""
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

    def _dead_letter(
        self, reason: str, status: int | None, error: str, attempts: int, first_at: float
    ) -> DeadLetterNote:
        self._stats.dead_lettered[reason] += 1
        self._stats.note_error(self._name, f"dead-lettered ({reason}): {error}")
        return DeadLetterNote(
            reason=reason,
            status=status,
            error=error,
            attempts=attempts,
            first_attempt_at=first_at,
            last_attempt_at=time.time(),
        )
