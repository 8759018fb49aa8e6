"""What fleet intake's append costs: the `APPEND` script (streams.py) against the MULTI/EXEC
pipeline it replaced (a cluster pipeline had no MULTI before redis-py 6.x), the same entries on
one real `redis-server` (AOF, fsync always, as the fleet's docs ask), time per call.

Run: `.venv/bin/python -m tests.benchmarks.bench_fleet_append`. The two alternate in rounds of
400 calls and each reports the median of 5 rounds (this shared VM's speed drifts).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from forwarder.fleet.streams import APPEND, FIELD
from tests.redisserver import running_redis

RAW = b'["evt-000001","r1","PURCHASE","12.5",null,null,null,1796229858.1,"default"]'
CALLS = 400
ROUNDS = 5


async def per_call_us(call: Callable[[], Awaitable[Any]]) -> float:
    """The median over ROUNDS of the mean time of CALLS calls, in microseconds."""
    for _ in range(50):
        await call()
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            await call()
        samples.append((time.perf_counter() - started) / CALLS * 1e6)
    return statistics.median(samples)


async def main() -> None:
    async with running_redis() as server:
        redis = server.client()
        script = redis.register_script(APPEND)
        for size in (1, 20, 100):
            keys = [f"{{bench:acct}}:p:{i % 16}" for i in range(size)]

            async def multi(keys: list[str] = keys) -> Any:
                pipe = redis.pipeline(transaction=True)
                for key in keys:
                    pipe.xadd(key, {FIELD: RAW})
                return await pipe.execute()

            async def lua(keys: list[str] = keys) -> Any:
                return await script(keys=keys, args=[FIELD, *([RAW] * len(keys))])

            await redis.flushall()
            took_multi = await per_call_us(multi)
            await redis.flushall()
            took_lua = await per_call_us(lua)
            print(
                f"batch {size:>3}: MULTI {took_multi:7.1f} us/call   "
                f"APPEND script {took_lua:7.1f} us/call"
            )
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
