"""The dispatcher: one delivery lane per account, over the shared queue.

The queue holds back later events of a recipient while one is in delivery; each account's
`Lane` (`lane.py`) pulls its events and delivers them under the account's flow control: its
`Gates` (`gates.py`), the rate budget it is handed (`flow/budget.py`, built here by a factory:
today a `LocalRateBudget` per account) and its concurrency limit (`flow/concurrency.py`). What a
lane records of each outcome is in `outcomes.py`. The dispatcher starts, reconfigures, drains,
retires and stops the lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from prometheus_client import Histogram

from forwarder.delivery.flow.budget import RateBudget, Sleep, local_budget
from forwarder.delivery.lane import Lane, LaneSettings, Sender
from forwarder.delivery.outcomes import Outcomes
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.queue import EventQueue

# Builds an account's rate budget from its configured quota (per minute).
BudgetFactory = Callable[[str, int], RateBudget]


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
        budgets: BudgetFactory | None = None,
    ) -> None:
        self._queue = queue
        self._outcomes = outcomes
        self._status = status
        self._stats = stats
        self._latency = latency
        self._sleep = sleep
        self._clock = clock
        self._budgets = budgets or self._local_budget
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
            budget=self._budgets(name, settings.per_minute),
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

    def _local_budget(self, name: str, per_minute: int) -> RateBudget:
        return local_budget(per_minute, clock=self._clock, sleep=self._sleep)

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
