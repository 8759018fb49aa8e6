"""Fleet mode on a Redis Cluster end to end: two `forwarder run` with queue.mode "fleet" on a
`redis+cluster://` URL (3 primaries, 3 replicas), `forwarder mock-remote`, and
`forwarder fleet status --json` read from the cluster."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import spawn
from tests.e2e.test_fleet_queue import Daemon, Mock, batch, check, created_all, fleet, send
from tests.rediscluster import RedisClusterGroup

PREFIX = "fwce"


async def test_two_hosts_on_a_cluster_deliver_every_event_once_in_order(
    daemon: Daemon, mock_remote: Mock, redis_cluster: RedisClusterGroup
) -> None:
    mock = await mock_remote()
    hosts = await fleet(
        daemon, mock, redis_cluster.url, 2, settings={"key_prefix": PREFIX, "partitions": 4}
    )
    await asyncio.sleep(1.0)  # the hosts see each other and share the partitions
    sent = 0
    for _ in range(4):
        for host in hosts:
            await send(host, batch(sent, 50))
            sent += 50
    check(await created_all(mock, sent, timeout=20), sent)

    status = await spawn("fleet", "status", "--json", "--config", str(hosts[0].config_path))
    assert await status.wait() == 0, status.stderr
    state = json.loads("\n".join(status.stdout))
    assert sorted(m["member"] for m in state["members"] if m["live"]) == ["host-0", "host-1"]
    (queue,) = state["queue"]["accounts"]
    assert queue["account"] == "default"
    assert queue["length"] == 0  # all settled: acknowledged and deleted
    assert sorted(state["queue"]["consumers"]) == ["host-0", "host-1"]
