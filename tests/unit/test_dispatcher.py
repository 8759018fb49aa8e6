"""The dispatcher's decisions: delivered, retried, dead-lettered, paused on a refused key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from forwarder.config.schema import RemoteConfig, RetryConfig
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.delivery.dispatcher import BudgetFactory, Dispatcher
from forwarder.delivery.flow.budget import RateBudget
from forwarder.delivery.flow.ratelimit import Ticket
from forwarder.delivery.lane import LaneSettings
from forwarder.delivery.remote import Result, Verdict
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.storage.queue import EventQueue

FAST = RetryConfig(initial_backoff_s=0.001, max_backoff_s=0.01, max_elapsed_s=5.0)


def event(n: int) -> Event:
    return Event(event_id=f"evt-{n:010d}", recipient_id=str(n), name="PAGE_VIEW")


@dataclass
class ScriptedSender:
    """Answers each event with the next verdict from its script (default: delivered)."""

    scripts: dict[str, list[Result]] = field(default_factory=dict)
    default: Callable[[], Result] = lambda: Result(Verdict.DELIVERED, 200, remote_id=1)
    calls: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def send(self, ev: Event) -> Result:
        self.calls.append(ev.event_id)
        if self.gate is not None:
            await self.gate.wait()
        script = self.scripts.get(ev.event_id)
        if script:
            return script.pop(0)
        return self.default()


@dataclass
class RecordingOutcomes:
    """The dispatcher's outcomes, kept in lists (the daemon's go to the spool)."""

    delivered_ids: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def delivered(self, event: Event, spool_seq: int) -> None:
        self.delivered_ids.append(event.event_id)

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        self.records.append(note.record(event))


@dataclass
class Rig:
    queue: EventQueue
    sender: ScriptedSender
    stats: Stats
    dispatcher: Dispatcher
    outcomes: RecordingOutcomes

    async def settle(self, count: int, timeout: float = 5.0) -> None:
        async def done() -> None:
            while self.stats.delivered + sum(self.stats.dead_lettered.values()) < count:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(done(), timeout)

    def dead(self) -> list[dict[str, Any]]:
        return self.outcomes.records


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    made: list[Rig] = []

    async def make(
        sender: ScriptedSender | None = None,
        *,
        concurrency: int = 2,
        retry: RetryConfig = FAST,
        auth_retry_s: float = 0.02,
        budgets: BudgetFactory | None = None,
    ) -> Rig:
        queue = EventQueue(1000)
        stats = Stats()
        outcomes = RecordingOutcomes()
        sender = sender or ScriptedSender()
        dispatcher = Dispatcher(queue, outcomes=outcomes, stats=stats, budgets=budgets)
        remote = RemoteConfig(concurrency=concurrency, auth_retry_s=auth_retry_s)
        # Events made here name no account (""): the lane of that name delivers them.
        dispatcher.add("", sender, LaneSettings(per_minute=1_000_000, remote=remote, retry=retry))
        dispatcher.start()
        rig = Rig(queue, sender, stats, dispatcher, outcomes)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.dispatcher.stop()


async def test_delivers_everything_once(make_rig: MakeRig) -> None:
    rig = await make_rig()
    assert rig.queue.offer([event(n) for n in range(20)])
    await rig.settle(20)
    assert sorted(rig.sender.calls) == [f"evt-{n:010d}" for n in range(20)]
    assert rig.stats.delivered == 20
    assert rig.stats.attempts == 20


async def test_transient_failures_are_retried_with_the_same_key(make_rig: MakeRig) -> None:
    retry = Result(Verdict.RETRY, 503, error="unavailable")
    sender = ScriptedSender(
        scripts={"evt-0000000001": [retry, retry, Result(Verdict.DELIVERED, 409, duplicate=True)]}
    )
    rig = await make_rig(sender)
    rig.queue.offer([event(1)])
    await rig.settle(1)
    assert sender.calls == ["evt-0000000001"] * 3
    assert (rig.stats.delivered, rig.stats.duplicates, rig.stats.retries) == (1, 1, 2)


async def test_permanent_errors_are_dead_lettered_with_details(make_rig: MakeRig) -> None:
    sender = ScriptedSender(
        scripts={"evt-0000000002": [Result(Verdict.PERMANENT, 422, error="invalid value")]}
    )
    rig = await make_rig(sender)
    rig.queue.offer([event(1), event(2)])
    await rig.settle(2)
    (record,) = rig.dead()
    assert record["reason"] == "rejected"
    assert record["status"] == 422
    assert record["error"] == "invalid value"
    assert record["attempts"] == 1
    assert isinstance(record["event"], dict)
    assert record["event"]["event_id"] == "evt-0000000002"
    assert rig.stats.dead_lettered == {"rejected": 1}
    assert rig.stats.delivered == 1


async def test_gives_up_after_max_elapsed(make_rig: MakeRig) -> None:
    sender = ScriptedSender(default=lambda: Result(Verdict.RETRY, 500, error="boom"))
    rig = await make_rig(
        sender, retry=RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.02, max_elapsed_s=0.1)
    )
    rig.queue.offer([event(1)])
    await rig.settle(1)
    (record,) = rig.dead()
    assert record["reason"] == "gave_up"
    assert "gave up after" in str(record["error"])
    assert isinstance(record["attempts"], int)
    assert record["attempts"] >= 2


async def test_refused_key_pauses_everything_and_dead_letters_nothing(make_rig: MakeRig) -> None:
    bad_key = {"ok": False}

    def answer() -> Result:
        if bad_key["ok"]:
            return Result(Verdict.DELIVERED, 200)
        return Result(Verdict.AUTH, 401, error="You need an API key")

    sender = ScriptedSender(default=answer)
    rig = await make_rig(sender, concurrency=3, auth_retry_s=0.05)
    rig.queue.offer([event(n) for n in range(10)])
    lane = rig.dispatcher.lanes[""]
    for _ in range(100):
        if lane.auth.is_open:
            break
        await asyncio.sleep(0.01)
    assert lane.auth.is_open
    assert "401" in rig.dispatcher.not_ready_reason()
    await asyncio.sleep(0.2)
    # Only the events already in delivery were tried; the rest wait in the queue (the lane
    # holds at most one more than its concurrency: the one waiting for a slot).
    assert len(set(sender.calls)) <= 3
    assert len(rig.queue) >= 6
    assert rig.stats.dead_lettered == {}
    bad_key["ok"] = True
    await rig.settle(10)
    assert not lane.auth.is_open
    assert rig.dispatcher.not_ready_reason() == ""
    assert rig.stats.delivered == 10
    assert rig.stats.dead_lettered == {}


async def test_stop_hands_back_in_flight_then_queued(make_rig: MakeRig) -> None:
    sender = ScriptedSender(gate=asyncio.Event())  # never opened: workers hang mid-request
    rig = await make_rig(sender, concurrency=2)
    rig.queue.offer([event(n) for n in range(5)])
    await asyncio.sleep(0.05)
    assert rig.dispatcher.in_delivery == 3  # two sending, one waiting for a slot
    drained = await rig.dispatcher.drain(0.05, asyncio.Event())
    assert not drained
    leftovers = await rig.dispatcher.stop()
    assert [e.event_id for e, _ in leftovers] == [f"evt-{n:010d}" for n in range(5)]
    assert len(rig.queue) == 0


async def test_drain_returns_early_when_done_and_on_force(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.queue.offer([event(n) for n in range(5)])
    assert await rig.dispatcher.drain(5.0, asyncio.Event())
    stuck = await make_rig(ScriptedSender(gate=asyncio.Event()))
    stuck.queue.offer([event(1)])
    force = asyncio.Event()
    force.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await stuck.dispatcher.drain(30.0, force)
    assert loop.time() - started < 1.0


async def test_a_bug_dead_letters_the_event_and_keeps_the_worker(make_rig: MakeRig) -> None:
    class Broken(ScriptedSender):
        async def send(self, ev: Event) -> Result:
            if ev.event_id == "evt-0000000001":
                raise RuntimeError("bug")
            return await super().send(ev)

    rig = await make_rig(Broken(), concurrency=1)
    rig.queue.offer([event(1), event(2)])
    await rig.settle(2)
    assert rig.stats.dead_lettered == {"internal_error": 1}
    assert rig.stats.delivered == 1
    assert rig.dispatcher.lanes[""].in_delivery == 0
    rig.queue.offer([event(3)])
    await rig.settle(3)  # the lane still delivers after the bug


async def test_a_reload_relearns_the_rate_window(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = await make_rig()
    lane = rig.dispatcher.lanes[""]
    relearned: list[bool] = []
    monkeypatch.setattr(lane.budget, "relearn_window", lambda: relearned.append(True))
    lane.configure(lane.settings)  # a reload that changes nothing still relearns the window
    assert relearned == [True]


@dataclass
class ScriptedBudget:
    """A rate budget that is not the local one: what a shared (Redis) budget would be to a lane."""

    per_minute: int
    waits: int = 2  # try_acquire says "wait" this many times before it hands out tickets
    acquired: int = 0  # tickets handed out by the awaited path
    observed: list[tuple[int, int | None, bool]] = field(default_factory=list)
    reloads: list[str] = field(default_factory=list)

    def try_acquire(self) -> Ticket | float:
        if self.waits:
            self.waits -= 1
            return 0.5
        return Ticket(7)

    async def acquire(self) -> Ticket:
        self.acquired += 1
        return Ticket(7)

    def observe(
        self,
        ticket: Ticket,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        reset_s: float | None = None,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.observed.append((ticket.epoch, remaining, rate_limited))

    @property
    def paused_until(self) -> float:
        return 0.0

    def view(self) -> dict[str, Any]:
        return {"shared": True, "per_minute": self.per_minute}

    def set_per_minute(self, per_minute: int) -> None:
        self.reloads.append(f"per_minute={per_minute}")

    def relearn_window(self) -> None:
        self.reloads.append("relearn")


async def test_a_lane_delivers_under_the_budget_it_is_handed(make_rig: MakeRig) -> None:
    budgets: dict[str, ScriptedBudget] = {}

    def factory(name: str, per_minute: int) -> RateBudget:
        budgets[name] = ScriptedBudget(per_minute)
        return budgets[name]

    answer = Result(Verdict.DELIVERED, 200, remote_id=1, rate_remaining=41)
    rig = await make_rig(ScriptedSender(default=lambda: answer), concurrency=1, budgets=factory)
    rig.queue.offer([event(n) for n in range(4)])
    await rig.settle(4)
    budget = budgets[""]
    assert budget.per_minute == 1_000_000  # built from the lane's settings
    assert budget.acquired == 2  # each "wait" from the fast path went to the awaited path
    assert budget.observed == [(7, 41, False)] * 4  # every answer, for its own ticket
    lane = rig.dispatcher.lanes[""]
    assert lane.view()["rate_limit"] == {"shared": True, "per_minute": 1_000_000}
    lane.configure(LaneSettings(600, lane.settings.remote, lane.settings.retry))
    assert budget.reloads == ["relearn", "per_minute=600"]
