"""Three `forwarder run` hosts share one account's rate budget through one Redis.

Each host alone would send at the whole quota; together, in a fleet, they stay under it: no
window of the mock remote over its quota, no 429, every event created exactly once. With Redis
frozen (SIGSTOP) the hosts fall back to a third of the learnt limit each, and come back after:
no stampede there, nor after Redis is back (at most EDGE_STRAYS requests at a window's edge).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from tests.conftest import DaemonProc, MockProc
from tests.e2e.test_flow import StartDaemon, StartMock, post_batch, stats_of, wait_until
from tests.redisserver import RedisServer

HOSTS = 3
PER_HOST = 60
# 1200 a minute in 2-second windows: 40 requests a window, 20 a second for the whole fleet.
RATE_LIMIT = 1200
WINDOW_S = 2
QUOTA = RATE_LIMIT * WINDOW_S // 60
# Requests a window's edge may let through around an outage (one round trip's worth; the fleet
# sends 20 a second): the no-fault test allows none.
EDGE_STRAYS = 2


async def start_fleet(
    mock_remote: StartMock, daemon: StartDaemon, redis_server: RedisServer
) -> tuple[MockProc, list[DaemonProc]]:
    """A mock remote with one limited account, and HOSTS forwarders sharing its budget."""
    mock = await mock_remote("--rate-limit", str(RATE_LIMIT), "--window-s", str(WINDOW_S))
    hosts = [
        await daemon(
            mock.base_url,
            remote={"rate_limit_per_minute": RATE_LIMIT},
            fleet={"redis_url": redis_server.url, "member": f"host-{n}", "key_prefix": "e2e"},
        )
        for n in range(HOSTS)
    ]
    return mock, hosts


async def send_batches(hosts: list[DaemonProc]) -> None:
    """PER_HOST events to each host, ten recipients of its own, values in sending order."""
    for n, host in enumerate(hosts):
        batch = [
            {"recipient_id": f"h{n}-r{i % 10}", "name": "PAGE_VIEW", "value": str(i)}
            for i in range(PER_HOST)
        ]
        async with aiohttp.ClientSession(base_url=host.url) as http_host:
            assert (await post_batch(http_host, batch))[0] == 202


async def test_three_hosts_share_the_quota_without_a_429(
    mock_remote: StartMock, daemon: StartDaemon, redis_server: RedisServer
) -> None:
    mock, hosts = await start_fleet(mock_remote, daemon, redis_server)
    async with aiohttp.ClientSession() as http:
        await send_batches(hosts)

        async def all_created() -> bool:
            return len((await mock.record())["events"]) >= HOSTS * PER_HOST

        await wait_until(all_created, 40)
        await asyncio.sleep(0.5)  # a duplicate would show up now
        async with http.get(f"{hosts[0].url}/v1/stats") as response:
            fleet = (await response.json())["fleet"]
    record = await mock.record()
    stats = record["stats"]
    # Every window within the quota (so no 429), from the first one on.
    assert stats["rate_limited"] == 0, stats
    assert max(stats["window_counts"]) <= QUOTA, stats["window_counts"]
    # Every event created once, each recipient's in order.
    events = sorted(record["events"], key=lambda e: e["id"])
    assert len(events) == HOSTS * PER_HOST
    keys = Counter((e["recipient_id"], e["value"]) for e in events)
    assert max(keys.values()) == 1
    by_recipient: dict[str, list[int]] = {}
    for event in events:
        by_recipient.setdefault(event["recipient_id"], []).append(int(event["value"]))
    assert all(values == sorted(values) for values in by_recipient.values())
    # All three delivered, as one fleet.
    assert fleet["mode"] == "fleet"
    assert fleet["live_members"] == HOSTS
    for host in hosts:
        async with aiohttp.ClientSession(base_url=host.url) as http_host:
            assert (await stats_of(http_host))["counters"]["delivered"] > 0


async def test_a_frozen_redis_is_fallback_without_a_stampede(
    mock_remote: StartMock, daemon: StartDaemon, redis_server: RedisServer
) -> None:
    mock, hosts = await start_fleet(mock_remote, daemon, redis_server)
    await send_batches(hosts)
    await asyncio.sleep(2 * WINDOW_S)  # the fleet delivers from Redis
    redis_server.freeze()
    try:
        await asyncio.sleep(2 * WINDOW_S + 1)  # the hosts deliver on their local shares
        modes = []
        for host in hosts:
            async with aiohttp.ClientSession(base_url=host.url) as http_host:
                modes.append((await stats_of(http_host))["fleet"]["mode"])
    finally:
        redis_server.resume()

    async def all_created() -> bool:
        return len((await mock.record())["events"]) >= HOSTS * PER_HOST

    await wait_until(all_created, 40)
    record = await mock.record()
    assert modes == ["fallback"] * HOSTS
    # No stampede: each host alone takes a third of the learnt limit (at the full limit each, the
    # fallback windows would carry 3 x QUOTA and 80 429s each); and none after Redis is back,
    # while the shared window is relearnt and the hosts return one by one. What can slip through
    # is a request sent within one round trip of a window's end, counted in the next window
    # (budgetscript.py): seen once in about ten runs, so EDGE_STRAYS allows for it.
    assert record["stats"]["rate_limited"] <= EDGE_STRAYS, record["stats"]
    assert max(record["stats"]["window_counts"]) <= QUOTA + EDGE_STRAYS, record["stats"]
    events = record["events"]
    assert len(events) == HOSTS * PER_HOST
    assert len({(e["recipient_id"], e["value"]) for e in events}) == len(events)

    async def back_in_the_fleet() -> bool:
        for host in hosts:
            async with aiohttp.ClientSession(base_url=host.url) as http_host:
                if (await stats_of(http_host))["fleet"]["mode"] != "fleet":
                    return False
        return True

    await wait_until(back_in_the_fleet, 10)
