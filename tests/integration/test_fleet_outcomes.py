"""Outcomes in Redis (fleet/outcomes.py) against a real server: kept by the fenced settle and
dead-letter scripts, found by any host, trimmed by count and by age, none kept when told so."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis

from forwarder.fleet.connection import as_text
from forwarder.fleet.outcomes import FleetOutcomes, encode_row, outcome_keys
from forwarder.fleet.streams import Streams
from forwarder.storage.eventstatus import Outcome
from tests.integration.test_fleet_streams import ACCOUNT, KEYS, PREFIX, append, event, leases


@dataclass
class Keep:
    retention_s: float = 3600.0
    max_count: int = 100


def delivered(n: int, remote_id: int) -> tuple[str, bytes]:
    row = Outcome("delivered", f"evt-{n:010d}", 7, ACCOUNT, 1, 1_700_000_000.5, remote_id).row()
    return row[0], encode_row(row)


async def settled_with_outcomes(
    redis_client: aioredis.Redis, keep: Keep, count: int, start: int = 0
) -> Streams:
    s = Streams(redis_client, prefix=PREFIX, member="host-a", keep=keep)
    lease = await leases(redis_client, "host-a").acquire(ACCOUNT, 0)
    assert lease is not None
    await append(s, [event(n) for n in range(start, start + count)])
    entries = await s.read(ACCOUNT, 0, count)
    outcomes = [delivered(start + i, 1000 + start + i) for i in range(count)]
    assert await s.settle(lease, [e.entry_id for e in entries], outcomes) == count
    return s


async def test_a_settle_keeps_each_outcome_for_any_host(redis_client: aioredis.Redis) -> None:
    await settled_with_outcomes(redis_client, Keep(), 3)
    other_host = FleetOutcomes(redis_client, PREFIX, lambda: ["default", ACCOUNT])
    row = await other_host.find("evt-0000000002", None)
    assert row is not None
    found = Outcome.from_row(row)
    assert (found.state, found.remote_id, found.account, found.attempts) == (
        "delivered", 1002, ACCOUNT, 1,
    )  # fmt: skip
    assert found.number == 0, "numbers are the accepting host's: not stored"
    assert await other_host.find("evt-0000000002", ACCOUNT) == row
    assert await other_host.find("evt-0000000099", None) is None
    hash_key, index_key = outcome_keys(KEYS)
    assert 0 < await redis_client.pttl(hash_key) <= 3_600_000
    assert await redis_client.zcard(index_key) == 3


async def test_a_dead_letter_keeps_its_outcome(redis_client: aioredis.Redis) -> None:
    s = Streams(redis_client, prefix=PREFIX, member="host-a", keep=Keep())
    lease = await leases(redis_client, "host-a").acquire(ACCOUNT, 0)
    assert lease is not None
    await append(s, [event(5)])
    (entry,) = await s.read(ACCOUNT, 0, 1)
    row = Outcome(
        "dead_lettered", "evt-0000000005", 0, ACCOUNT, 3, 1.0, None, "rejected", 422, "bad"
    ).row()
    assert await s.dead_letter(
        lease, entry.entry_id, {"reason": "rejected"}, (row[0], encode_row(row))
    )
    found = await FleetOutcomes(redis_client, PREFIX, lambda: [ACCOUNT]).find(
        "evt-0000000005", None
    )
    assert found is not None
    assert Outcome.from_row(found).reason == "rejected"
    assert await redis_client.xlen(KEYS.dead) == 1


async def test_outcomes_past_the_count_or_the_age_go_oldest_first(
    redis_client: aioredis.Redis,
) -> None:
    keep = Keep(max_count=5)
    await settled_with_outcomes(redis_client, keep, 8)
    hash_key, index_key = outcome_keys(KEYS)
    assert await redis_client.hlen(hash_key) == 5
    kept = {as_text(m) for m in await redis_client.zrange(index_key, 0, -1)}
    assert kept == {f"evt-{n:010d}" for n in range(3, 8)}
    # Older than the retention: gone at the next settle (which keeps its own).
    keep.retention_s, keep.max_count = 0.2, 100
    await asyncio.sleep(0.3)
    await settled_with_outcomes(redis_client, keep, 2, start=20)
    kept = {as_text(m) for m in await redis_client.zrange(index_key, 0, -1)}
    assert kept == {"evt-0000000020", "evt-0000000021"}
    assert await redis_client.hlen(hash_key) == 2


async def test_none_are_kept_when_told_so(redis_client: aioredis.Redis) -> None:
    await settled_with_outcomes(redis_client, Keep(max_count=0), 3)
    assert not await redis_client.exists(*outcome_keys(KEYS))
