"""Fleet mode's shared queue end to end: three `forwarder run` with queue.mode "fleet", one
real Redis, `forwarder mock-remote`. Every event is created once and each recipient's events in
the order they were sent, through a host killed with SIGKILL mid-load, a Redis frozen
(SIGSTOP/SIGCONT), a Redis restarted on its data directory, and a 20 s Redis outage during intake.

Timings are short on purpose: lease_s 1 s, claim_idle_s 3 s, remote.timeout_s 2 s, so a dead
host's entries are claimed within about claim_idle_s + 2 s.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import DaemonProc, MockProc
from tests.redisserver import RedisServer

Daemon = Callable[..., Awaitable[DaemonProc]]
Mock = Callable[..., Awaitable[MockProc]]
RECIPIENTS = 24


async def fleet(
    daemon: Daemon,
    mock: MockProc,
    redis_url: str,
    hosts: int = 3,
    *,
    settings: dict[str, object] | None = None,
    **sections: dict[str, object],
) -> list[DaemonProc]:
    """`hosts` daemons host-0, host-1, ... in queue.mode "fleet" on `redis_url`, with short
    timings (module docstring); `settings` adds to `[fleet]`, `sections` to the others."""
    started = []
    for n in range(hosts):
        started.append(
            await daemon(
                mock.base_url,
                queue={"mode": "fleet"},
                remote={"timeout_s": 2.0, "connect_timeout_s": 1.0},
                fleet={
                    "redis_url": redis_url,
                    "member": f"host-{n}",
                    "partitions": 8,
                    "lease_s": 1.0,
                    "claim_idle_s": 3.0,
                    **(settings or {}),
                },
                **sections,
            )
        )
    return started


def batch(start: int, count: int, host: int | None = None) -> list[dict[str, str]]:
    """Events start..start+count-1, value n: to recipient n % RECIPIENTS, or with `host` to
    that host's own recipients."""
    prefix = "r" if host is None else f"h{host}"
    return [
        {
            "event_id": f"evt-fleet-{n:08d}",
            "recipient_id": f"{prefix}-{n % RECIPIENTS}",
            "name": "PURCHASE",
            "value": str(n),
        }
        for n in range(start, start + count)
    ]


async def send(host: DaemonProc, events: list[dict[str, str]]) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{host.url}/v1/events", json=events) as response,
    ):
        assert response.status == 202, await response.text()


async def stats(host: DaemonProc) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{host.url}/v1/stats") as response:
        result: dict[str, Any] = await response.json()
        return result


async def created_all(mock: MockProc, total: int, timeout: float) -> list[dict[str, Any]]:
    """The remote's created events once `total` distinct ones are there (fails after timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events: list[dict[str, Any]] = (await mock.record())["events"]
        if len({e["idempotency_key"] for e in events}) >= total:
            return events
        assert loop.time() < deadline, f"{len(events)} of {total} created within {timeout} s"
        await asyncio.sleep(0.2)


def check(events: list[dict[str, Any]], total: int) -> None:
    """Each event created exactly once; each recipient's in the order sent."""
    keys = [e["idempotency_key"] for e in events]
    assert len(keys) == len(set(keys)) == total, "an event was created twice or is missing"
    by_recipient: dict[str, list[int]] = {}
    for e in events:
        by_recipient.setdefault(e["recipient_id"], []).append(int(e["value"]))
    for recipient, values in by_recipient.items():
        assert values == sorted(values), f"{recipient} out of order: {values}"


async def test_three_hosts_deliver_every_event_once_in_order_through_a_kill_and_a_stop(
    daemon: Daemon, mock_remote: Mock, redis_server: RedisServer
) -> None:
    mock = await mock_remote()
    hosts = await fleet(daemon, mock, redis_server.url)
    await asyncio.sleep(1.0)  # the hosts see each other and share the partitions
    sent = 0
    for _ in range(3):
        for host in hosts:
            await send(host, batch(sent, 50))
            sent += 50
    # One host dies with its share in hand; the others claim its entries.
    await mock.set_faults(latency_ms=300)
    for host in hosts:
        await send(host, batch(sent, 50))
        sent += 50
    await asyncio.sleep(0.5)
    hosts[0].proc.process.send_signal(signal.SIGKILL)
    await hosts[0].proc.process.wait()
    await mock.set_faults(latency_ms=0)
    for host in hosts[1:]:
        await send(host, batch(sent, 50))
        sent += 50
    check(await created_all(mock, sent, timeout=20), sent)
    # The survivors took the dead host's unsettled entries over, and say so.
    claimed = 0
    for host in hosts[1:]:
        queue = (await stats(host))["fleet"]["queue"]
        assert queue["partitions_held"] >= 1
        assert queue["intake"] == "redis"
        claimed += queue["claimed"]
    assert claimed > 0
    # A clean stop drains this host's window only (not the fleet's backlog: the backlog here
    # outlasts shutdown.timeout_s), then hands its partitions and unsettled entries over at
    # once: the last host delivers everything.
    await mock.set_faults(latency_ms=20)
    for _ in range(3):
        await send(hosts[2], batch(sent, 500))
        sent += 500
    await asyncio.sleep(0.5)
    assert await hosts[1].stop() == 0
    logs = hosts[1].proc.logs()
    at = next(i for i, r in enumerate(logs) if r.get("event") == "stopping")
    after = [r for r in logs[at:] if r.get("event") == "delivered"]
    # What it delivered after the signal was in its window then: it loaded nothing more.
    assert len(after) <= logs[at]["queued"] + logs[at]["in_flight"]
    await mock.set_faults(latency_ms=0)
    check(await created_all(mock, sent, timeout=20), sent)


# The outage: longer than every fleet timing above.
OUTAGE_S = 20.0


@pytest.mark.timeout(120)
async def test_redis_frozen_restarted_and_away_during_intake_loses_nothing(
    daemon: Daemon, mock_remote: Mock, redis_server: RedisServer
) -> None:
    mock = await mock_remote()
    hosts = await fleet(daemon, mock, redis_server.url)
    await asyncio.sleep(1.0)
    sent = 0

    async def send_round() -> None:
        # Each host its own recipients: while a host falls back, its events wait in its own
        # spool, so only the order of the events one host accepted can be kept (the docs say).
        nonlocal sent
        for n, host in enumerate(hosts):
            await send(host, batch(sent, 40, host=n))
            sent += 40

    await send_round()
    # Frozen: appends are not acknowledged in time, so intake answers from the local spool.
    redis_server.freeze()
    await send_round()
    redis_server.resume()
    await send_round()
    # Restarted on its data directory (AOF): what it acknowledged is still there.
    await redis_server.stop()
    await redis_server.start()
    await send_round()
    # Away for 20 s during intake (many times lease_s and claim_idle_s: every lease is lost):
    # every append goes to the local spool, and into Redis once it is back.
    await redis_server.stop()
    outage_ends = asyncio.get_running_loop().time() + OUTAGE_S
    while asyncio.get_running_loop().time() < outage_ends:
        await send_round()
        await asyncio.sleep(2.0)
    await redis_server.start()
    await send_round()
    check(await created_all(mock, sent, timeout=30), sent)
    for host in hosts:
        events = [r.get("event") for r in host.proc.logs()]
        assert "fleet_queue_fallback" in events
        assert "fleet_queue_recovered" in events
