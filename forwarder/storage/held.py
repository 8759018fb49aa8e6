"""Events held without an account: kept apart from the queue, bounded, and given a deadline.

An event is held when its account has no delivery lane: the account left the configuration, or
a client key has not been presented since a restart (its key is known only from a request). Such
events cannot be delivered until the account is back, so they must not take the queue's room
from the accounts that can deliver: they are taken out of the queue into this store, which has
a bound of its own (`queue.held_max_events`) and a deadline (`queue.held_max_age_s`, counted
from when the event was accepted). An event past its deadline is dead-lettered with the reason
`held_without_account`; so is the oldest event past the bound when the event log cannot keep
it (`trim`: memory mode; in durable mode the events past the bound stay in the spool, not read,
until the store has room). When the account comes back (its key is presented again, or a reload
configures it), its held events return to the queue ahead of anything new.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import structlog

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.delivery.outcomes import Outcomes
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.storage.queue import EventQueue

log = structlog.get_logger("forwarder.held")

# The reason of the dead letters this store writes.
HELD = "held_without_account"
# How often the daemon sweeps: events of accounts without a lane leave the queue within it.
SWEEP_S = 1.0


class HeldEvents:
    """The events of accounts without a lane, per account, oldest first."""

    def __init__(
        self,
        queue: EventQueue,
        outcomes: Outcomes,
        stats: Stats,
        *,
        max_events: int,
        max_age_s: float,
        has_lane: Callable[[str], bool],
        trim: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.max_events = max_events
        self.max_age_s = max_age_s
        self._outcomes = outcomes
        self._stats = stats
        self._has_lane = has_lane
        # Dead-letter the oldest past the bound (False: the event log keeps them out of memory).
        self._trim_bound = trim
        self._clock = clock
        self._held: dict[str, deque[tuple[Event, int]]] = {}
        self._count = 0
        # Called when the sweep took events out of the queue (the spool window can refill).
        self.on_room: Callable[[], None] = _nothing
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep now, then every SWEEP_S."""
        self.sweep()
        self._task = asyncio.create_task(self._run(), name="held-sweep")

    async def stop(self) -> list[tuple[Event, int]]:
        """Stop sweeping; returns every held event with its spool row (0: in memory only), for
        the stop to save, and holds none any more."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        held = [pair for events in self._held.values() for pair in events]
        self._held.clear()
        self._count = 0
        return held

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep()

    def __len__(self) -> int:
        return self._count

    def view(self) -> dict[str, int]:
        """How many events each account without a lane has held."""
        return {name: len(events) for name, events in self._held.items() if events}

    def full(self, account: str) -> bool:
        """Whether events of `account` must stay out of memory for now (durable mode's spool
        window asks): it has no lane and this store has no room."""
        return self._count >= self.max_events and not self._has_lane(account)

    def sweep(self) -> int:
        """Take the waiting events of accounts without a lane out of the queue, then dead-letter
        the held events past their deadline (and, with `trim`, past the bound); returns how
        many were dead-lettered."""
        took = 0
        for name in self.queue.accounts():
            if not self._has_lane(name):
                taken = self.queue.take_account_spooled(name)
                if taken:
                    self._held.setdefault(name, deque()).extend(taken)
                    self._count += len(taken)
                    took += len(taken)
        expired = self._expire()
        overflow = self._trim() if self._trim_bound else 0
        if took:
            self.on_room()
        return expired + overflow

    def release(self, account: str) -> int:
        """The account has a lane again: its held events go back to the queue (past its bound,
        like events saved at a stop); returns how many."""
        held = self._held.pop(account, None)
        if not held:
            return 0
        self._count -= len(held)
        self.queue.restore([event for event, _ in held], [seq for _, seq in held])
        log.info("held_events_released", account=account, count=len(held))
        return len(held)

    def _expire(self) -> int:
        deadline = self._clock() - self.max_age_s
        expired: dict[str, int] = {}
        for name, events in list(self._held.items()):
            while events and events[0][0].accepted_at < deadline:
                event, seq = events.popleft()
                self._dead_letter(
                    event,
                    seq,
                    f"held without an account for more than queue.held_max_age_s"
                    f" ({self.max_age_s:g} s)",
                )
                expired[name] = expired.get(name, 0) + 1
            if not events:
                del self._held[name]
        if expired:
            log.warning("held_events_dead_lettered", reason=HELD, cause="deadline", **_by(expired))
        return sum(expired.values())

    def _trim(self) -> int:
        trimmed: dict[str, int] = {}
        while self._count > self.max_events:
            # The oldest event of all: the one whose account's first is accepted earliest.
            name = min(self._held, key=lambda n: self._held[n][0][0].accepted_at)
            event, seq = self._held[name].popleft()
            if not self._held[name]:
                del self._held[name]
            self._dead_letter(
                event,
                seq,
                f"more than queue.held_max_events ({self.max_events}) events held without"
                " an account",
            )
            trimmed[name] = trimmed.get(name, 0) + 1
        if trimmed:
            log.warning("held_events_dead_lettered", reason=HELD, cause="bound", **_by(trimmed))
        return sum(trimmed.values())

    def _dead_letter(self, event: Event, seq: int, error: str) -> None:
        self._count -= 1
        self._stats.dead_lettered[HELD] += 1
        now = self._clock()
        note = DeadLetterNote(
            reason=HELD, status=None, error=error, attempts=0, first_attempt_at=now,
            last_attempt_at=now,
        )  # fmt: skip
        self._outcomes.dead_lettered(event, seq, note)


def _by(counts: dict[str, int]) -> dict[str, object]:
    return {"accounts": counts, "count": sum(counts.values())}


def _nothing() -> None:
    return None
