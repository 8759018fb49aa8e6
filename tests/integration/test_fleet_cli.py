"""`forwarder fleet drain` / `undrain` and the shared queue's part of `forwarder fleet status`,
against a real Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from forwarder.cli import fleetqueue
from forwarder.cli.main import main
from forwarder.config.load import load_config
from forwarder.events import Event
from forwarder.fleet.leases import Leases
from forwarder.fleet.ownership import drain_key
from forwarder.fleet.partition import partition_of
from forwarder.fleet.streams import Streams, encode_event
from tests.redisserver import RedisServer, fleet_config_file

PREFIX = "fwcli"
PARTITIONS = 4


def config_file(tmp_path: Path, server: RedisServer) -> str:
    return fleet_config_file(tmp_path, server, prefix=PREFIX, partitions=PARTITIONS)


async def test_drain_and_undrain_name_the_member(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, redis_server)
    # Through the command line: `forwarder fleet drain` is registered on `forwarder fleet`.
    assert await asyncio.to_thread(main, ["fleet", "drain", "host-b", "--config", path]) == 0
    assert "host-b is drained" in capsys.readouterr().out
    args = argparse.Namespace(config=path, member="host-b")
    client = redis_server.client()
    try:
        assert await client.smembers(drain_key(PREFIX)) == {b"host-b"}
        assert await asyncio.to_thread(fleetqueue.cmd_undrain, args) == 0
        assert "takes partitions again" in capsys.readouterr().out
        assert await client.smembers(drain_key(PREFIX)) == set()
        assert await asyncio.to_thread(fleetqueue.cmd_undrain, args) == 0
        assert "was not drained" in capsys.readouterr().out
    finally:
        await client.aclose()


async def test_drain_without_a_reachable_redis_exits_2(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, redis_server)
    await redis_server.stop()
    args = argparse.Namespace(config=path, member="host-b")
    assert await asyncio.to_thread(fleetqueue.cmd_drain, args) == 2
    assert "cannot reach Redis" in capsys.readouterr().err


async def test_the_status_shows_streams_pending_and_holders(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = load_config(Path(config_file(tmp_path, redis_server)))
    client = redis_server.client()
    try:
        streams = Streams(client, prefix=PREFIX, member="host-a")
        events = [
            Event(event_id=f"evt-cli-{n:06d}", recipient_id="r-1", name="X", account="default")
            for n in range(5)
        ]
        partition = partition_of("r-1", PARTITIONS)
        await streams.append("default", [(partition, encode_event(e)) for e in events])
        lease = await Leases(client, prefix=PREFIX, member="host-a", lease_s=5).acquire(
            "default", partition
        )
        assert lease is not None
        await streams.read("default", partition, 2)
        state = await fleetqueue.read_queues(client, config)
    finally:
        await client.aclose()
    (account,) = state["accounts"]
    assert (account["account"], account["length"], account["pending"]) == ("default", 5, 2)
    assert state["partitions_held"] == {"host-a": 1}
    text = "\n".join(fleetqueue.render_queues(state))
    assert "default" in text
    assert "stream 5" in text
    assert "pending 2" in text


async def test_fleet_status_shows_the_shared_queue(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_file(tmp_path, redis_server)
    client = redis_server.client()
    try:
        streams = Streams(client, prefix=PREFIX, member="host-a")
        event = Event(event_id="evt-cli-status", recipient_id="r-1", name="X", account="default")
        await streams.append("default", [(partition_of("r-1", PARTITIONS), encode_event(event))])
    finally:
        await client.aclose()
    assert await asyncio.to_thread(main, ["fleet", "status", "--config", path]) == 0
    out = capsys.readouterr().out
    assert "shared queue:" in out
    assert "stream 1" in out
    assert await asyncio.to_thread(main, ["fleet", "status", "--json", "--config", path]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["queue"]["accounts"][0]["length"] == 1
