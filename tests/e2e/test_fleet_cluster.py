"""Fleet mode on a Redis Cluster end to end: two `forwarder run` with queue.mode "fleet" on a
`redis+cluster://` URL (3 primaries, 3 replicas), `forwarder mock-remote`, and
`forwarder fleet status --json` read from the cluster."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import DaemonProc, MockProc, spawn
from tests.redisserver import RedisClusterGroup

Daemon = Callable[..., Awaitable[DaemonProc]]
Mock = Callable[..., Awaitable[MockProc]]
PREFIX = "fwce"


async def send(host: DaemonProc, start: int, count: int) -> None:
    events = [
        {"event_id": f"evt-ce-{n:06d}", "recipient_id": f"r-{n % 11}", "name": "PURCHASE",
         "value": str(n)}
        for n in range(start, start + count)
    ]  # fmt: skip
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{host.url}/v1/events", json=events) as response,
    ):
        assert response.status == 202, await response.text()


async def created(mock: MockProc, total: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events: list[dict[str, Any]] = (await mock.record())["events"]
        if len({e["idempotency_key"] for e in events}) >= total or loop.time() > deadline:
            return events
        await asyncio.sleep(0.2)


async def test_two_hosts_on_a_cluster_deliver_every_event_once_in_order(
    daemon: Daemon, mock_remote: Mock, redis_cluster: RedisClusterGroup
) -> None:
    mock = await mock_remote()
    hosts = [
        await daemon(
            mock.base_url,
            queue={"mode": "fleet"},
            remote={"timeout_s": 2.0, "connect_timeout_s": 1.0},
            fleet={
                "redis_url": redis_cluster.url,
                "member": f"host-{n}",
                "key_prefix": PREFIX,
                "partitions": 4,
                "lease_s": 1.0,
                "claim_idle_s": 3.0,
            },
        )
        for n in range(2)
    ]
    await asyncio.sleep(1.0)  # the hosts see each other and share the partitions
    sent = 0
    for _ in range(4):
        for host in hosts:
            await send(host, sent, 50)
            sent += 50
    events = await created(mock, sent)
    keys = [e["idempotency_key"] for e in events]
    assert len(keys) == len(set(keys)) == sent
    by_recipient: dict[str, list[int]] = {}
    for e in events:
        by_recipient.setdefault(e["recipient_id"], []).append(int(e["value"]))
    assert all(values == sorted(values) for values in by_recipient.values())

    status = await spawn("fleet", "status", "--json", "--config", str(hosts[0].config_path))
    assert await status.wait() == 0, status.stderr
    state = json.loads("\n".join(status.stdout))
    assert sorted(m["member"] for m in state["members"] if m["live"]) == ["host-0", "host-1"]
    (queue,) = state["queue"]["accounts"]
    assert queue["account"] == "default"
    assert queue["length"] == 0  # all settled: acknowledged and deleted
    assert sorted(state["queue"]["consumers"]) == ["host-0", "host-1"]
