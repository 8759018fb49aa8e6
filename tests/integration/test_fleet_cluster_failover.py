"""Fleet mode through a Redis Cluster failover: an in-process daemon (queue.mode "fleet" on a
`redis+cluster://` URL) takes a steady load while the primary holding its account's slot is
failed over by hand, or killed with SIGKILL; `forwarder mock-remote` counts what is created.

Nothing is refused at intake, nothing is lost, nothing is created twice, in both cases: a
manual failover moves the slot with no write lost (the replica caught up first); after a kill
the daemon falls back to its local spool for the seconds the election takes, then moves the
spool into the promoted replica. The test waits for the replica to have what was appended
before the kill (Redis replicates asynchronously: docs/how-to/fleet.md says what a kill can
lose otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from forwarder.config.load import load_config
from forwarder.daemon.lifecycle import Daemon
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.intake.accounts import configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from tests.conftest import API_KEY, MockProc, write_config
from tests.rediscluster import RedisClusterGroup
from tests.redisserver import RedisServer

Mock = Callable[..., Awaitable[MockProc]]
PREFIX = "fwcf"
TAG = AccountKeys(PREFIX, "default").tag
BATCH = 20


async def started(tmp: Path, cluster: RedisClusterGroup, mock: MockProc) -> Daemon:
    path = tmp / "forwarder.toml"
    write_config(
        path,
        {
            "intake": {"http_listen": "127.0.0.1:0", "drop_in_answer": "accepted"},
            "remote": {"base_url": mock.base_url, "timeout_s": 2.0, "connect_timeout_s": 1.0},
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
            "state": {"dir": str(tmp / "state")},
            "shutdown": {"timeout_s": 5.0},
            "queue": {"mode": "fleet"},
            "fleet": {
                "redis_url": cluster.url,
                "member": "host-a",
                "key_prefix": PREFIX,
                "partitions": 4,
                "lease_s": 1.0,
                "claim_idle_s": 3.0,
            },
        },
    )
    config = load_config(path, env={})  # the config check accepts the cluster URL
    daemon = Daemon(config, configured_accounts(config, ApiKey(Secret(API_KEY), "test"), {}))
    task = asyncio.create_task(daemon.run())
    daemon_tasks.add(task)
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    assert daemon.ready.is_set()
    return daemon


daemon_tasks: set[asyncio.Task[int]] = set()


async def stopped(daemon: Daemon) -> None:
    daemon.request_stop()
    for task in list(daemon_tasks):
        assert await asyncio.wait_for(task, 15) == 0
        daemon_tasks.discard(task)


class Load:
    """Batches of events posted one after the other until stopped; every answer kept."""

    def __init__(self, daemon: Daemon) -> None:
        self.url = f"{daemon.addresses[0]}/v1/events"
        self.sent = 0
        self.statuses: list[int] = []
        self._stop = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as http:
            while not self._stop.is_set():
                events = [
                    {"event_id": f"evt-cf-{n:06d}", "recipient_id": f"r-{n % 7}",
                     "name": "PURCHASE", "value": str(n)}
                    for n in range(self.sent, self.sent + BATCH)
                ]  # fmt: skip
                async with http.post(self.url, json=events) as response:
                    self.statuses.append(response.status)
                self.sent += BATCH
                await asyncio.sleep(0.05)

    async def stop(self) -> int:
        self._stop.set()
        await asyncio.wait_for(self.task, 15)
        return self.sent


async def created_once(mock: MockProc, total: int, timeout: float = 20.0) -> None:
    """Every one of `total` events created, none twice, each recipient's in order."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events: list[dict[str, Any]] = (await mock.record())["events"]
        if len({e["idempotency_key"] for e in events}) >= total or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    keys = [e["idempotency_key"] for e in events]
    assert len(keys) == len(set(keys)) == total, f"{len(set(keys))} of {total}, {len(keys)} rows"
    by_recipient: dict[str, list[int]] = {}
    for e in events:
        by_recipient.setdefault(e["recipient_id"], []).append(int(e["value"]))
    for recipient, values in by_recipient.items():
        assert values == sorted(values), f"{recipient} out of order"


async def replicated(primary: RedisServer) -> None:
    """Once this returns, the primary's replica has everything written to it so far: a write
    of our own in the same slot, then WAIT (replication keeps the primary's order)."""
    client = primary.client()
    try:
        await client.set(f"{TAG}:probe", "1")
        assert await client.wait(1, 5000) == 1
    finally:
        await client.aclose()


async def test_a_manual_failover_under_load_refuses_nothing_and_loses_nothing(
    tmp_path: Path, redis_cluster: RedisClusterGroup, mock_remote: Mock
) -> None:
    mock = await mock_remote()
    daemon = await started(tmp_path, redis_cluster, mock)
    try:
        primary = await redis_cluster.primary_of(TAG)
        replica = await redis_cluster.replica_of(primary)
        load = Load(daemon)
        await asyncio.sleep(0.5)
        await redis_cluster.failover(replica)
        assert await redis_cluster.primary_of(TAG) is replica
        await asyncio.sleep(0.5)
        total = await load.stop()
        assert set(load.statuses) == {202}
        await created_once(mock, total)
        assert daemon.fleet is not None
        view = daemon.fleet.view()
        # redis-py followed the slot to the promoted replica (MOVED): no fallback was needed.
        assert view["fallbacks"] == 0
        assert view["queue"]["moved_from_spool"] == 0
    finally:
        await stopped(daemon)


async def test_a_killed_primary_falls_back_to_the_spool_then_the_promoted_replica(
    tmp_path: Path, redis_cluster: RedisClusterGroup, mock_remote: Mock
) -> None:
    mock = await mock_remote()
    daemon = await started(tmp_path, redis_cluster, mock)
    try:
        primary = await redis_cluster.primary_of(TAG)
        load = Load(daemon)
        await asyncio.sleep(0.5)
        await replicated(primary)
        promoted = await redis_cluster.kill_primary(primary)  # load goes on meanwhile
        assert await redis_cluster.primary_of(TAG) is promoted
        await asyncio.sleep(1.0)
        total = await load.stop()
        assert set(load.statuses) == {202}
        await created_once(mock, total)
        assert daemon.fleet is not None
        queue = daemon.fleet.view()["queue"]
        # The host wrote to its local spool while the slot had no primary, then moved it.
        assert queue["moved_from_spool"] > 0
        assert queue["spooled"] == 0
        assert queue["intake"] == "redis"
    finally:
        await stopped(daemon)
