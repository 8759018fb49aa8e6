"""What keeping outcomes costs a fleet's settle: the `SETTLE` script (streams.py) with the
events' outcomes (`state.outcome_max_count` > 0, the default: kept in `{P:A}:outcomes` for
`GET /v1/events/{id}` on any host, fleet/outcomes.py) against the same settles keeping none
(`outcome_max_count = 0`), on one real `redis-server` (AOF, fsync always, as the fleet's docs
ask), per settled event.

Run: `.venv/bin/python -m tests.benchmarks.bench_fleet_settle`. Each round appends BATCH
events, reads them and settles them in one call, timing the settle only; the two kinds
alternate, ROUNDS rounds each, and each reports its median (this shared VM's speed drifts). The
outcomes kept reach the count cap during the run, so the trimming is in the figure too.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from forwarder.events import Event
from forwarder.fleet.leases import Lease, Leases
from forwarder.fleet.outcomes import encode_row
from forwarder.fleet.streams import Streams, encode_event
from forwarder.storage.eventstatus import Outcome
from tests.redisserver import running_redis

BATCH = 200
ROUNDS = 40
CAP = 2_000  # outcomes kept per account: reached after 10 rounds, trimmed from then on


@dataclass
class Keep:
    retention_s: float = 86_400.0
    max_count: int = CAP


async def settle_us(redis: aioredis.Redis, streams: Streams, lease: Lease, round_: int) -> float:
    """One round: BATCH events appended and read, then settled; µs per settled event."""
    events = [
        Event(event_id=f"evt-{round_:04d}-{i:05d}", recipient_id="r", name="PURCHASE", account="a")
        for i in range(BATCH)
    ]
    await streams.append("a", [(0, encode_event(e)) for e in events])
    entries = await streams.read("a", 0, BATCH)
    outcomes = [
        (e.event_id, encode_row(Outcome("delivered", e.event_id, 0, "a", 1, 1.0, 4711).row()))
        for e in events
    ]
    started = time.perf_counter()
    await streams.settle(lease, [x.entry_id for x in entries], outcomes)
    return (time.perf_counter() - started) / BATCH * 1e6


async def main() -> None:
    async with running_redis() as server:
        redis = server.client()
        kinds = {"outcomes kept": Keep(), "none kept": Keep(max_count=0)}
        runs = {}
        for name, keep in kinds.items():
            prefix = "bench-keep" if keep.max_count else "bench-none"
            streams = Streams(redis, prefix=prefix, member="m", keep=keep)
            lease = await Leases(redis, prefix=prefix, member="m", lease_s=600).acquire("a", 0)
            assert lease is not None
            runs[name] = (streams, lease)
        samples: dict[str, list[float]] = {name: [] for name in kinds}
        for round_ in range(ROUNDS):
            for name, (streams, lease) in runs.items():
                samples[name].append(await settle_us(redis, streams, lease, round_))
        medians = {name: statistics.median(v) for name, v in samples.items()}
        for name, median in medians.items():
            print(f"{name:>14}: {median:6.1f} us per settled event (median of {ROUNDS} rounds)")
        ratio = medians["outcomes kept"] / medians["none kept"]
        print(f"outcomes kept / none kept: {ratio:.2f}x")
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
