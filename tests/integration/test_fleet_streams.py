"""The shared queue's Redis half against a real server: leases, appends, reads, fenced settles,
claims of a dead member's entries, dead letters."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from forwarder.events import Event
from forwarder.fleet.leases import Leases
from forwarder.fleet.partition import partition_of
from forwarder.fleet.queuekeys import GROUP, AccountKeys, accounts_key
from forwarder.fleet.streams import Streams, encode_event

PREFIX = "fwtest"
ACCOUNT = "acme"
KEYS = AccountKeys(PREFIX, ACCOUNT)


def leases(redis_client: aioredis.Redis, member: str, lease_s: float = 5.0) -> Leases:
    return Leases(redis_client, prefix=PREFIX, member=member, lease_s=lease_s)


def streams(redis_client: aioredis.Redis, member: str) -> Streams:
    return Streams(redis_client, prefix=PREFIX, member=member)


def event(n: int, recipient: str = "r-1") -> Event:
    return Event(event_id=f"evt-{n:010d}", recipient_id=recipient, name="PURCHASE", account=ACCOUNT)


async def append(s: Streams, events: list[Event], partitions: int = 1) -> list[bytes]:
    return await s.append(
        ACCOUNT, [(partition_of(e.recipient_id, partitions), encode_event(e)) for e in events]
    )


async def test_a_held_lease_is_not_given_to_another_member(redis_client: aioredis.Redis) -> None:
    a = await leases(redis_client, "host-a").acquire(ACCOUNT, 3)
    assert a is not None
    assert a.generation == 1
    assert await leases(redis_client, "host-b").acquire(ACCOUNT, 3) is None
    assert await redis_client.get(KEYS.lease(3)) == b"host-a 1"
    assert await leases(redis_client, "host-a").renew(a)
    # Another partition is free.
    other = await leases(redis_client, "host-b").acquire(ACCOUNT, 4)
    assert other is not None


async def test_an_expired_lease_goes_to_the_next_member_with_a_higher_generation(
    redis_client: aioredis.Redis,
) -> None:
    la, lb = (
        leases(redis_client, "host-a", lease_s=0.3),
        leases(redis_client, "host-b", lease_s=0.3),
    )
    a = await la.acquire(ACCOUNT, 0)
    assert a is not None
    assert la.valid(a)
    await asyncio.sleep(0.4)
    assert not la.valid(a)
    b = await lb.acquire(ACCOUNT, 0)
    assert b is not None
    assert b.generation == a.generation + 1
    assert not await la.renew(a)
    assert not la.valid(a)
    assert await lb.renew(b)


async def test_the_holder_stops_before_redis_lets_the_lease_go(
    redis_client: aioredis.Redis,
) -> None:
    now = [100.0]
    la = Leases(redis_client, prefix=PREFIX, member="host-a", lease_s=10.0, clock=lambda: now[0])
    lease = await la.acquire(ACCOUNT, 0)
    assert lease is not None
    # Measured from the send of the acquire, lease_s minus the margin: before Redis's PX ends.
    assert lease.valid_until == pytest.approx(100.0 + 10.0 - 1.0)
    now[0] = 105.0
    assert await la.renew(lease)
    assert lease.valid_until == pytest.approx(105.0 + 9.0)
    now[0] = 114.0
    assert not la.valid(lease)
    ttl = await redis_client.pttl(KEYS.lease(0))
    assert 9000 < ttl <= 10000  # Redis still holds it for nearly the whole lease


async def test_appended_events_are_read_in_order_per_partition(
    redis_client: aioredis.Redis,
) -> None:
    s = streams(redis_client, "host-a")
    events = [event(i, recipient=f"r-{i % 5}") for i in range(60)]
    await append(s, events, partitions=4)
    assert await redis_client.sismember(accounts_key(PREFIX), ACCOUNT)
    got: dict[int, list[Event]] = {}
    for p in range(4):
        entries = await s.read(ACCOUNT, p, 100)
        got[p] = [e.event for e in entries if e.event is not None]
    for p in range(4):
        expected = [e for e in events if partition_of(e.recipient_id, 4) == p]
        assert got[p] == expected
    assert sum(len(v) for v in got.values()) == 60


async def test_settling_acks_and_deletes_so_the_stream_does_not_grow(
    redis_client: aioredis.Redis,
) -> None:
    s = streams(redis_client, "host-a")
    lease = await leases(redis_client, "host-a").acquire(ACCOUNT, 0)
    assert lease is not None
    await append(s, [event(i) for i in range(5)])
    entries = await s.read(ACCOUNT, 0, 10)
    assert await s.settle(lease, [e.entry_id for e in entries]) == 5
    assert await redis_client.xlen(KEYS.stream(0)) == 0
    assert (await redis_client.xpending(KEYS.stream(0), GROUP))["pending"] == 0


async def test_a_stale_holders_settle_is_refused(redis_client: aioredis.Redis) -> None:
    la, lb = (
        leases(redis_client, "host-a", lease_s=0.2),
        leases(redis_client, "host-b", lease_s=5.0),
    )
    sa = streams(redis_client, "host-a")
    a = await la.acquire(ACCOUNT, 0)
    assert a is not None
    await append(sa, [event(1), event(2)])
    entries = await sa.read(ACCOUNT, 0, 10)
    await asyncio.sleep(0.3)
    b = await lb.acquire(ACCOUNT, 0)
    assert b is not None
    assert await sa.settle(a, [e.entry_id for e in entries]) == -1
    assert not await sa.dead_letter(a, entries[0].entry_id, {"reason": "rejected"})
    # Nothing was acknowledged: both entries still wait for their next owner.
    assert (await redis_client.xpending(KEYS.stream(0), GROUP))["pending"] == 2
    assert await redis_client.xlen(KEYS.stream(0)) == 2
    assert await redis_client.xlen(KEYS.dead) == 0


async def test_a_dead_members_entries_are_claimed(
    redis_client: aioredis.Redis,
) -> None:
    sa, sb = streams(redis_client, "host-a"), streams(redis_client, "host-b")
    await append(sa, [event(i) for i in range(4)])
    first = await sa.read(ACCOUNT, 0, 10)  # host-a takes them, then dies
    assert len(first) == 4
    assert await sb.pending_of_others(ACCOUNT, 0) == 4
    claimed = await sb.claim_others(ACCOUNT, 0, 10)
    assert [e.event for e in claimed] == [e.event for e in first]
    assert await sb.pending_of_others(ACCOUNT, 0) == 0
    lease = await leases(redis_client, "host-b").acquire(ACCOUNT, 0)
    assert lease is not None
    assert await sb.settle(lease, [e.entry_id for e in claimed]) == 4
    assert await redis_client.xlen(KEYS.stream(0)) == 0


async def test_a_released_lease_hands_its_entries_over_at_once(
    redis_client: aioredis.Redis,
) -> None:
    la, lb = leases(redis_client, "host-a"), leases(redis_client, "host-b")
    sa, sb = streams(redis_client, "host-a"), streams(redis_client, "host-b")
    a = await la.acquire(ACCOUNT, 0)
    assert a is not None
    await append(sa, [event(i) for i in range(3)])
    assert len(await sa.read(ACCOUNT, 0, 10)) == 3
    assert await la.release(a, group=GROUP, idle_ms=60_000, limit=100) == 3
    assert not la.valid(a)
    assert await redis_client.exists(KEYS.lease(0)) == 0
    b = await lb.acquire(ACCOUNT, 0)
    assert b is not None
    # No wait for claim_idle_s: the releasing member said it has nothing in flight.
    claimed = await sb.claim_others(ACCOUNT, 0, 10)
    assert [e.event for e in claimed] == [event(i) for i in range(3)]
    assert await la.release(a, group=GROUP, idle_ms=60_000, limit=100) == -1


async def test_own_pending_entries_are_read_again_after_a_restart(
    redis_client: aioredis.Redis,
) -> None:
    s = streams(redis_client, "host-a")
    await append(s, [event(1), event(2)])
    assert len(await s.read(ACCOUNT, 0, 10)) == 2
    assert await s.read(ACCOUNT, 0, 10) == []
    again = streams(redis_client, "host-a")  # the same member, restarted
    assert [e.event for e in await again.read(ACCOUNT, 0, 10, pending=True)] == [
        event(1),
        event(2),
    ]


async def test_a_missing_group_is_created_again(redis_client: aioredis.Redis) -> None:
    s = streams(redis_client, "host-a")
    assert await s.read(ACCOUNT, 0, 10) == []  # no stream, no group yet
    await redis_client.delete(KEYS.stream(0))  # as after a Redis that lost its data
    await append(s, [event(7)])
    assert [e.event for e in await s.read(ACCOUNT, 0, 10)] == [event(7)]
    await redis_client.delete(KEYS.stream(0))
    assert await s.claim_others(ACCOUNT, 0, 10) == []
    assert await s.pending_of_others(ACCOUNT, 0) == 0


async def test_a_dead_letter_moves_to_the_dead_stream(redis_client: aioredis.Redis) -> None:
    s = streams(redis_client, "host-a")
    lease = await leases(redis_client, "host-a").acquire(ACCOUNT, 0)
    assert lease is not None
    await append(s, [event(1)])
    (entry,) = await s.read(ACCOUNT, 0, 10)
    assert await s.dead_letter(lease, entry.entry_id, {"reason": "rejected", "status": "422"})
    assert await redis_client.xlen(KEYS.stream(0)) == 0
    rows = await redis_client.xrange(KEYS.dead)
    assert [(fields or {}).get(b"reason") for _id, fields in rows or ()] == [b"rejected"]


async def test_claiming_takes_the_others_entries_in_order_and_leaves_its_own(
    redis_client: aioredis.Redis,
) -> None:
    sa, sb = streams(redis_client, "host-a"), streams(redis_client, "host-b")
    await append(sa, [event(i) for i in range(4)])
    assert len(await sa.read(ACCOUNT, 0, 2)) == 2  # host-a: 0, 1
    assert len(await sb.read(ACCOUNT, 0, 2)) == 2  # host-b: 2, 3 (its own, in its window)
    claimed = await sb.claim_others(ACCOUNT, 0, 10)
    assert [e.event for e in claimed] == [event(0), event(1)]
    assert await sb.pending_of_others(ACCOUNT, 0) == 0
    assert await sb.claim_others(ACCOUNT, 0, 10) == []


async def test_a_lease_says_whether_its_last_holder_released_it(
    redis_client: aioredis.Redis,
) -> None:
    la, lb = leases(redis_client, "host-a", lease_s=0.2), leases(redis_client, "host-b")
    first = await la.acquire(ACCOUNT, 0)
    assert first is not None
    assert first.clean  # nobody held it before
    await asyncio.sleep(0.3)  # host-a's lease runs out: nothing says its requests ended
    taken = await lb.acquire(ACCOUNT, 0)
    assert taken is not None
    assert not taken.clean
    assert await lb.release(taken, group=GROUP, idle_ms=1000, limit=10) == 0
    handed = await la.acquire(ACCOUNT, 0)
    assert handed is not None
    assert handed.clean  # released: nothing of host-b's in flight
