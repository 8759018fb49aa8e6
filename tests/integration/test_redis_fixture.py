"""The fleet tests' Redis: a real server, restartable on its data, with AOF on."""

from __future__ import annotations

from tests.redisserver import RedisServer


async def test_the_server_keeps_acknowledged_writes_across_a_restart(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    try:
        assert (await client.config_get("appendonly"))["appendonly"] == "yes"
        await client.xadd("s", {"f": "v"})
    finally:
        await client.aclose()
    await redis_server.stop()
    await redis_server.start()
    client = redis_server.client()
    try:
        assert await client.xlen("s") == 1
    finally:
        await client.aclose()
