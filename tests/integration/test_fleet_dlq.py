"""`forwarder dlq` in queue.mode "fleet": dead letters read, shown, replayed and purged from
Redis, each output naming its source; `--spool` reads the local spool instead."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from forwarder.cli.main import main
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.fleet.leases import Leases
from forwarder.fleet.partition import partition_of
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.fleet.streams import Streams, encode_event
from forwarder.fleet.window import FleetWindow
from forwarder.storage.queue import EventQueue
from tests.redisserver import RedisServer, fleet_config_file

PREFIX = "fwdlq"
ACCOUNT = "default"
PARTITIONS = 4


async def dead_letter(client: aioredis.Redis, event: Event) -> None:
    streams = Streams(client, prefix=PREFIX, member="host-a")
    lease = await Leases(client, prefix=PREFIX, member="host-a", lease_s=5).acquire(
        ACCOUNT, partition_of(event.recipient_id, PARTITIONS)
    )
    assert lease is not None
    await streams.append(ACCOUNT, [(lease.partition, encode_event(event))])
    entry = (await streams.read(ACCOUNT, lease.partition, 10))[-1]
    window = FleetWindow(streams, EventQueue(10), claim_idle_ms=1000, valid=lambda _: True)
    fields = window.dead_fields(event, DeadLetterNote("rejected", 422, "bad value", 1, 1.0, 2.0))
    assert await streams.dead_letter(lease, entry.entry_id, fields)


def config(tmp_path: Path, server: RedisServer) -> str:
    return fleet_config_file(tmp_path, server, prefix=PREFIX, partitions=PARTITIONS)


async def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = await asyncio.to_thread(main, argv)
    return code, capsys.readouterr().out


async def test_dead_letters_come_from_redis_and_say_so(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis_server.client()
    try:
        event = Event(event_id="evt-dead-000001", recipient_id="r-9", name="X", account=ACCOUNT)
        await dead_letter(client, event)
        path = config(tmp_path, redis_server)

        code, out = await run(["dlq", "list", "--config", path], capsys)
        assert code == 0
        assert out.splitlines()[0].startswith("source: redis")
        assert "evt-dead-000001" in out
        assert "rejected" in out

        code, out = await run(["dlq", "list", "--json", "--config", path], capsys)
        (record,) = [json.loads(line) for line in out.splitlines()]
        assert record["source"] == "redis"
        assert record["status"] == 422
        letter_id = record["id"]
        assert letter_id.startswith(f"{ACCOUNT}/")

        code, out = await run(["dlq", "show", letter_id, "--config", path], capsys)
        assert code == 0
        assert json.loads(out)["event"]["event_id"] == "evt-dead-000001"

        code, out = await run(["dlq", "replay", letter_id, "--config", path], capsys)
        assert code == 0
        assert "replayed 1" in out
        assert "source: redis" in out
        keys = AccountKeys(PREFIX, ACCOUNT)
        assert await client.xlen(keys.dead) == 0
        rows = await client.xrange(keys.stream(partition_of("r-9", PARTITIONS)))
        assert [(f or {}).get(b"e") for _id, f in rows or ()] == [encode_event(event)]

        await dead_letter(client, event)
        code, out = await run(["dlq", "purge", "--before", "0s", "--config", path], capsys)
        assert code == 0
        assert "purged 1" in out
        assert await client.xlen(keys.dead) == 0
    finally:
        await client.aclose()


async def test_the_local_spool_is_read_with_spool(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, redis_server)
    code, _out = await run(["dlq", "list", "--spool", "--config", path], capsys)
    # No spool on this host yet: the spool path answers as in the other modes.
    assert code in (0, 1)
    code, _out = await run(["dlq", "show", f"{ACCOUNT}/1-0", "--spool", "--config", path], capsys)
    assert code == 2


async def test_without_a_reachable_redis_dlq_says_so_in_one_line(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, redis_server)
    await redis_server.stop()
    with pytest.raises(SystemExit) as exit_:
        await asyncio.to_thread(main, ["dlq", "list", "--config", path])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("forwarder dlq: cannot reach Redis: redis dlq: ")
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
