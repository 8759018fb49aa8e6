"""A lane whose outcomes sink is a `Fence` (the fleet's shared queue): an event its sink takes
back before an attempt is not sent and gets no outcome; the others go on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from forwarder.config.schema import RemoteConfig
from forwarder.delivery.dispatcher import Dispatcher
from forwarder.delivery.lane import LaneSettings
from forwarder.events import Event
from forwarder.ops.metrics import Stats
from forwarder.storage.queue import EventQueue
from tests.unit.test_dispatcher import FAST, RecordingOutcomes, ScriptedSender, event


@dataclass
class FencingOutcomes(RecordingOutcomes):
    """Takes back the events named in `lost` (their partition moved to another host)."""

    lost: set[str] = field(default_factory=set)
    asked: list[str] = field(default_factory=list)

    def may_deliver(self, ev: Event) -> bool:
        self.asked.append(ev.event_id)
        return ev.event_id not in self.lost


async def test_a_fenced_event_is_neither_sent_nor_settled() -> None:
    queue = EventQueue(100)
    outcomes = FencingOutcomes(lost={event(1).event_id})
    sender = ScriptedSender()
    dispatcher = Dispatcher(queue, outcomes=outcomes, stats=Stats())
    remote = RemoteConfig(concurrency=2)
    dispatcher.add("", sender, LaneSettings(per_minute=1_000_000, remote=remote, retry=FAST))
    dispatcher.start()
    try:
        assert queue.offer([event(n) for n in range(3)])
        async with asyncio.timeout(5):
            while len(outcomes.delivered_ids) < 2 or len(queue) or queue.in_delivery:
                await asyncio.sleep(0.005)
    finally:
        await dispatcher.stop()
    assert sorted(outcomes.asked) == [event(n).event_id for n in range(3)]
    assert sorted(sender.calls) == [event(0).event_id, event(2).event_id]
    assert sorted(outcomes.delivered_ids) == [event(0).event_id, event(2).event_id]
    assert outcomes.records == []  # no dead letter either
