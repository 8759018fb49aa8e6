"""The fleet backend through the event-log seam (`open_event_log` with queue.mode "fleet"),
against a real Redis: append, the next event in order, settle, dead-letter, the stop's release
and the next start; Redis away at intake (the local spool, then Redis)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis.asyncio as aioredis

from forwarder.config.schema import Config, FleetConfig, QueueConfig, StateConfig
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.fleet.fleetlog import FleetLog
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.log import EventLog, LogDeps, open_event_log
from forwarder.storage.queue import EventQueue
from tests.redisserver import RedisServer

PREFIX = "fwlog"
KEYS = AccountKeys(PREFIX, "default")


def ev(n: int, recipient: str = "r1") -> Event:
    return Event(
        event_id=f"flog-{n:06d}", recipient_id=recipient, name="VIEW", account="default",
        accepted_at=time.time(),
    )  # fmt: skip


async def opened(state: Path, server: RedisServer, member: str = "host-a") -> EventLog:
    state.mkdir(exist_ok=True)
    fleet = FleetConfig(
        redis_url=server.url, member=member, key_prefix=PREFIX, partitions=2, lease_s=1.0,
        claim_idle_s=3.0,
    )  # fmt: skip
    config = Config(state=StateConfig(dir=str(state)), queue=QueueConfig(mode="fleet"), fleet=fleet)
    log = await open_event_log(config, LogDeps(EventQueue(100), LogThrottle()))
    log.start()
    return log


async def take(log: EventLog) -> tuple[Event, int]:
    async with asyncio.timeout(5):
        event = await log.queue.get("default")
    return event, log.queue.done(event)


async def stop(log: EventLog) -> None:
    await log.stop()
    await log.release(log.queue.take_all_spooled())
    await log.close()


async def until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_appended_events_are_delivered_in_order_and_settled(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    log = await opened(tmp_path / "a", redis_server)
    try:
        assert isinstance(log, FleetLog)
        assert log.try_append([ev(0)]) is None  # Redis must acknowledge: awaited
        sent = [ev(n, recipient=f"r{n % 3}") for n in range(9)]
        assert await log.append(sent) == ""
        got = []
        for _ in sent:
            event, handle = await take(log)
            got.append(event)
            log.delivered(event, handle)
        assert sorted(e.event_id for e in got) == [e.event_id for e in sent]
        for r in ("r0", "r1", "r2"):
            mine = [e.event_id for e in got if e.recipient_id == r]
            assert mine == sorted(mine)

        async def settled() -> bool:
            return sum([await redis_client.xlen(KEYS.stream(p)) for p in range(2)]) == 0

        await until(settled)
        assert await log.append([ev(20)]) == ""
        event, handle = await take(log)
        note = DeadLetterNote("rejected", 422, "no", 1, time.time(), time.time())
        log.dead_lettered(event, handle, note)

        async def dead() -> bool:
            return bool(await redis_client.xlen(KEYS.dead) == 1)

        await until(dead)
    finally:
        await stop(log)


async def test_a_stop_hands_what_is_left_to_the_next_holder(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    first = await opened(tmp_path / "a", redis_server)
    sent = [ev(n) for n in range(5)]
    assert await first.append(sent) == ""
    await take(first)  # in delivery when the stop comes: its outcome never known
    await stop(first)
    second = await opened(tmp_path / "b", redis_server, member="host-b")
    try:
        got = [(await take(second))[0] for _ in sent]
        # All five again (the one in delivery too: the remote's 409 absorbs a repeat), in order.
        assert [e.event_id for e in got] == [e.event_id for e in sent]
    finally:
        await stop(second)


async def test_redis_away_at_intake_the_spool_takes_the_events_then_redis(
    tmp_path: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    log = await opened(tmp_path / "a", redis_server)
    try:
        assert isinstance(log, FleetLog)
        await redis_server.stop()
        sent = [ev(n) for n in range(4)]
        assert await log.append(sent[:2]) == ""
        assert await log.append(sent[2:]) == ""
        assert log.fallback.active
        assert log.stored().events == 4  # in the local spool, waiting for Redis
        await redis_server.start()
        got = [(await take(log))[0] for _ in sent]
        assert [e.event_id for e in got] == [e.event_id for e in sent]
        assert not log.fallback.active
        assert log.stored().events == 0
    finally:
        await stop(log)
