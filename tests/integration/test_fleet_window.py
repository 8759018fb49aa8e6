"""A fleet member's ownership, window and fallback against a real Redis and a real queue:
partitions shared out, events delivered once and settled, a dead member's partition taken over
in order, a drained member handing its partitions over, the local spool moved into Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.fleet import queuestatus
from forwarder.fleet.fallback import Fallback
from forwarder.fleet.leases import Leases
from forwarder.fleet.ownership import Ownership, consumers_key, drain_key, share
from forwarder.fleet.partition import partition_of
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.fleet.streams import Streams, encode_event
from forwarder.fleet.window import PARTITION_WINDOW, FleetWindow
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.spool import Spool

PREFIX = "fwtest"
ACCOUNT = "acme"
PARTITIONS = 4


class Member:
    """One member's pieces, as the fleet log wires them, without the daemon."""

    def __init__(
        self, redis_client: aioredis.Redis, name: str, *, lease_s: float = 1.0, claim_ms: int = 600
    ) -> None:
        self.queue = EventQueue(1000)
        self.streams = Streams(redis_client, prefix=PREFIX, member=name)
        self.leases = Leases(redis_client, prefix=PREFIX, member=name, lease_s=lease_s)
        self.window = FleetWindow(
            self.streams, self.queue, claim_idle_ms=claim_ms, valid=self.leases.valid
        )
        self.ownership = Ownership(
            redis_client,
            self.leases,
            prefix=PREFIX,
            partitions=PARTITIONS,
            claim_idle_ms=claim_ms,
            accounts=lambda: [ACCOUNT],
            in_flight=self.window.in_flight,
            gained=self.window.gained,
            lost=self.window.stopped,
        )

    async def round(self) -> None:
        self.ownership.check_expired()
        await self.ownership.tick()
        await self.window.fill()

    async def deliver_all(self) -> list[Event]:
        """Take every event the window holds, settle each, flush."""
        got = []
        while len(self.queue):
            event = await asyncio.wait_for(self.queue.get(ACCOUNT), 1)
            got.append(event)
            self.window.settle(self.queue.done(event))
        await self.window.flush()
        return got


def events(n: int, recipients: int = 8) -> list[Event]:
    return [
        Event(
            event_id=f"evt-{i:010d}", recipient_id=f"r-{i % recipients}", name="X", account=ACCOUNT
        )
        for i in range(n)
    ]


async def append(streams: Streams, batch: list[Event]) -> None:
    await streams.append(
        ACCOUNT, [(partition_of(e.recipient_id, PARTITIONS), encode_event(e)) for e in batch]
    )


def test_every_partition_has_one_owner_among_live_members() -> None:
    members = ["a", "b", "c"]
    shares = [share(m, members, ["acme", "other"], 16) for m in members]
    assert set().union(*shares) == {(a, p) for a in ("acme", "other") for p in range(16)}
    assert sum(len(s) for s in shares) == 32
    assert all(10 <= len(s) <= 12 for s in shares)
    assert share("d", members, ["acme"], 16) == set()


async def test_two_members_share_the_partitions_and_deliver_everything_once(
    redis_client: aioredis.Redis,
) -> None:
    a, b = Member(redis_client, "host-a"), Member(redis_client, "host-b")
    for _ in range(2):  # the first round sees only itself, the second both
        await a.round()
        await b.round()
    await a.round()
    assert len(a.ownership.held) == len(b.ownership.held) == 2
    assert not a.ownership.held.keys() & b.ownership.held.keys()
    sent = events(40)
    await append(a.streams, sent)
    await a.window.fill()
    await b.window.fill()
    got = await a.deliver_all() + await b.deliver_all()
    assert sorted(e.event_id for e in got) == [e.event_id for e in sent]
    for recipient in {e.recipient_id for e in sent}:
        mine = [e.event_id for e in got if e.recipient_id == recipient]
        assert mine == sorted(mine)
    keys = AccountKeys(PREFIX, ACCOUNT)
    assert [await redis_client.xlen(keys.stream(p)) for p in range(PARTITIONS)] == [0] * PARTITIONS
    assert a.window.counters.settled + b.window.counters.settled == 40


async def test_a_dead_members_partitions_are_taken_over_in_order(
    redis_client: aioredis.Redis,
) -> None:
    a, b = Member(redis_client, "host-a", lease_s=0.6), Member(redis_client, "host-b", lease_s=0.6)
    await a.round()  # host-a alone: every partition
    assert len(a.ownership.held) == PARTITIONS
    sent = events(20)
    await append(a.streams, sent)
    await a.window.fill()
    assert len(a.queue) == 20  # host-a took them all, then dies without a word
    await b.round()
    assert b.ownership.held == {}  # host-a's leases still run
    deadline = asyncio.get_running_loop().time() + 10
    got: list[Event] = []
    while len(got) < 20:
        assert asyncio.get_running_loop().time() < deadline, f"only {len(got)} taken over"
        await asyncio.sleep(0.2)
        await b.round()
        got += await b.deliver_all()
    assert [e.event_id for e in got if e.recipient_id == "r-3"] == [
        e.event_id for e in sent if e.recipient_id == "r-3"
    ]
    assert sorted(e.event_id for e in got) == [e.event_id for e in sent]
    assert b.window.counters.claimed == 20


async def test_a_stale_members_settles_are_refused_and_counted(
    redis_client: aioredis.Redis,
) -> None:
    a = Member(redis_client, "host-a", lease_s=0.3)
    await a.round()
    await append(a.streams, events(4, recipients=4))
    await a.window.fill()
    taken = [await a.queue.get(ACCOUNT) for _ in range(4)]
    await asyncio.sleep(0.4)  # host-a stalls past its lease; another takes the partitions
    await redis_client.zrem(consumers_key(PREFIX), "host-a")  # its beat ran out too
    b = Member(redis_client, "host-b")
    await b.round()
    assert len(b.ownership.held) == PARTITIONS
    for event in taken:
        a.window.settle(a.queue.done(event))
    await a.window.flush()
    assert a.window.counters.stale_settles == 4
    assert a.window.counters.settled == 0


async def test_a_lost_lease_takes_the_partitions_waiting_events_out_of_the_window(
    redis_client: aioredis.Redis,
) -> None:
    a = Member(redis_client, "host-a", lease_s=0.3)
    await a.round()
    await append(a.streams, events(12))
    await a.window.fill()
    assert len(a.queue) == 12
    await asyncio.sleep(0.35)
    a.ownership.check_expired()  # not renewed in time: stop before Redis lets go
    assert len(a.queue) == 0
    assert a.ownership.held == {}


async def test_a_drained_member_hands_its_partitions_over(redis_client: aioredis.Redis) -> None:
    a, b = Member(redis_client, "host-a"), Member(redis_client, "host-b")
    for _ in range(2):
        await a.round()
        await b.round()
    await append(a.streams, events(16))
    await a.window.fill()
    await redis_client.sadd(drain_key(PREFIX), "host-a")
    await a.round()  # drained: its waiting events leave the window, its leases go
    assert a.ownership.draining
    assert a.ownership.held == {}
    assert len(a.queue) == 0
    await b.round()
    await b.round()
    assert len(b.ownership.held) == PARTITIONS
    for _ in range(3):
        await b.window.fill()
    got = await b.deliver_all()
    assert sorted(e.event_id for e in got) == [e.event_id for e in events(16)]


async def test_a_dead_letter_is_fenced_and_kept(redis_client: aioredis.Redis) -> None:
    a = Member(redis_client, "host-a")
    await a.round()
    await append(a.streams, events(1))
    await a.window.fill()
    event = await a.queue.get(ACCOUNT)
    note = DeadLetterNote("rejected", 422, "bad", 1, 1.0, 2.0)
    a.window.dead_letter(a.queue.done(event), event, note)
    await a.window.flush()
    assert a.window.counters.dead_lettered == 1
    rows = await redis_client.xrange(AccountKeys(PREFIX, ACCOUNT).dead)
    assert [(f or {}).get(b"reason") for _id, f in rows or ()] == [b"rejected"]


async def test_the_local_spool_moves_into_redis_in_order_once_it_answers(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    streams = Streams(redis_client, prefix=PREFIX, member="host-a")
    redis_up = False

    async def to_redis(batch: list[Event]) -> None:
        if not redis_up:
            raise ConnectionError("redis away")
        await append(streams, batch)

    spool = await Spool.open(tmp_path)
    try:
        fallback = Fallback(spool, to_redis)
        fallback.start()
        sent = events(30)
        for start in range(0, 30, 10):
            assert await fallback.append(sent[start : start + 10], "redis away") == ""
        assert fallback.active
        assert spool.depth == 30
        redis_up = True
        deadline = asyncio.get_running_loop().time() + 5
        while fallback.active:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert spool.depth == 0
        assert fallback.moved == 30
        member = Member(redis_client, "host-a")
        await member.round()
        got = await member.deliver_all()
        assert sorted(e.event_id for e in got) == [e.event_id for e in sent]
        for recipient in {e.recipient_id for e in sent}:
            mine = [e.event_id for e in got if e.recipient_id == recipient]
            assert mine == sorted(mine)
        await fallback.stop()
    finally:
        await spool.close()


async def test_the_queue_status_shows_lengths_pending_and_holders(
    redis_client: aioredis.Redis,
) -> None:
    a = Member(redis_client, "host-a")
    await a.round()
    await append(a.streams, events(10, recipients=1))  # one recipient: one partition
    partition = partition_of("r-0", PARTITIONS)
    await a.window.fill()
    await asyncio.wait_for(a.queue.get(ACCOUNT), 1)  # one in delivery, nine waiting
    status = await queuestatus.account_queue(redis_client, PREFIX, ACCOUNT, PARTITIONS)
    assert status.length == 10
    assert status.pending == 10  # every loaded entry is handed to host-a
    assert status.partitions[partition].holder.startswith("host-a ")
    assert await queuestatus.known_accounts(redis_client, PREFIX, ["default"]) == [
        ACCOUNT,
        "default",
    ]
    assert (await queuestatus.consumers(redis_client, PREFIX))[0] == ["host-a"]


async def test_a_drain_ends_when_the_member_starts_again(redis_client: aioredis.Redis) -> None:
    await queuestatus.drain(redis_client, PREFIX, "host-a")
    assert (await queuestatus.consumers(redis_client, PREFIX))[1] == ["host-a"]
    a = Member(redis_client, "host-a")  # a new start of the drained member
    await a.round()
    assert not a.ownership.draining
    assert len(a.ownership.held) == PARTITIONS
    assert not await queuestatus.undrain(redis_client, PREFIX, "host-a")


async def test_a_partitions_window_is_bounded(redis_client: aioredis.Redis) -> None:
    a = Member(redis_client, "host-a")
    await a.round()
    await append(a.streams, events(PARTITION_WINDOW + 50, recipients=1))  # one partition
    for _ in range(3):
        await a.window.fill()
    assert len(a.queue) == PARTITION_WINDOW  # the rest waits in Redis for whoever is free
    await a.deliver_all()
    await a.window.fill()
    assert len(a.queue) == 50


async def test_an_event_in_a_lanes_hands_is_fenced_once_the_lease_is_lost(
    redis_client: aioredis.Redis,
) -> None:
    a = Member(redis_client, "host-a", lease_s=0.3)
    await a.round()
    await append(a.streams, events(2, recipients=1))
    await a.window.fill()
    first = await asyncio.wait_for(a.queue.get(ACCOUNT), 1)  # a lane holds it
    assert a.window.may_deliver(first)
    await asyncio.sleep(0.35)
    a.ownership.check_expired()  # the lease ran out here: the partition is stopped
    assert not a.window.may_deliver(first)
    a.queue.done(first)  # the lane drops it without an outcome
    assert a.window.counters.fenced == 1
    assert a.window.in_flight(ACCOUNT, partition_of("r-0", PARTITIONS)) == 0
    # Its entry still waits in Redis, handed to host-a, for the partition's next holder.
    keys = AccountKeys(PREFIX, ACCOUNT)
    pending = await redis_client.xpending(keys.stream(partition_of("r-0", PARTITIONS)), "deliver")
    assert pending["pending"] == 2


async def test_a_partition_not_released_is_claimed_only_claim_idle_s_after_taking_it(
    redis_client: aioredis.Redis,
) -> None:
    a = Member(redis_client, "host-a", lease_s=0.3, claim_ms=800)
    await a.round()
    await append(a.streams, events(5))
    await a.window.fill()  # host-a holds them, then stops answering
    await asyncio.sleep(0.35)
    await redis_client.zrem(consumers_key(PREFIX), "host-a")
    b = Member(redis_client, "host-b", claim_ms=800)
    await b.round()
    assert len(b.ownership.held) == PARTITIONS
    assert await b.window.fill() == 0  # a request of host-a's could still be in flight
    await asyncio.sleep(0.5)
    await b.round()  # renewed; still too early
    assert len(b.queue) == 0
    await asyncio.sleep(0.4)
    await b.round()
    await b.round()
    got = await b.deliver_all()
    assert sorted(e.event_id for e in got) == [e.event_id for e in events(5)]
