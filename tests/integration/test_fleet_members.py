"""The members' heartbeat, and the budget's fallback when Redis stops answering."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from forwarder.cli.fleet import cmd_fleet_status
from forwarder.cli.main import build_parser
from forwarder.config.schema import FleetConfig
from forwarder.delivery.flow.ratelimit import Ticket
from forwarder.fleet.budget import RedisRateBudget, SharedTicket
from forwarder.fleet.connection import FleetClient, connect
from forwarder.fleet.members import Members, read_members
from forwarder.fleet.mode import FleetMode
from tests.redisserver import RedisServer, free_port

BEAT_S = 0.1


def client_of(server: RedisServer, member: str) -> FleetClient:
    return connect(
        FleetConfig(redis_url=server.url, member=member, key_prefix="fwdtest"),
        member=member,
        password=None,
        socket_timeout_s=0.2,
    )


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[tuple[FleetClient, FleetClient]]:
    a, b = client_of(redis_server, "host-a"), client_of(redis_server, "host-b")
    yield a, b
    await a.aclose()
    await b.aclose()


async def until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_heartbeats_count_the_live_members(
    clients: tuple[FleetClient, FleetClient],
) -> None:
    a, b = clients
    mode_a, mode_b = FleetMode(), FleetMode()
    members_a = Members(a, mode_a, version="1.2.3", in_delivery=lambda: 4, interval_s=BEAT_S)
    members_b = Members(b, mode_b, version="1.2.3", interval_s=BEAT_S)
    assert await members_a.beat() == 1
    assert await members_b.beat() == 2
    listed = {m["member"]: m for m in await read_members(a, BEAT_S)}
    assert set(listed) == {"host-a", "host-b"}
    assert listed["host-a"]["mode"] == "fleet"
    assert listed["host-a"]["in_delivery"] == 4
    assert listed["host-a"]["live"] is True
    # b stops beating: a few heartbeats later a counts itself alone.
    await asyncio.sleep(BEAT_S * 3.5)
    assert await members_a.beat() == 1
    listed = {m["member"]: m for m in await read_members(a, BEAT_S)}
    assert listed["host-b"]["live"] is False


async def test_a_clean_stop_leaves_the_set(clients: tuple[FleetClient, FleetClient]) -> None:
    a, b = clients
    members_b = Members(b, FleetMode(), version="x", interval_s=BEAT_S)
    members_b.start()
    await until(lambda: members_b.beats >= 1)
    await members_b.stop()
    assert await Members(a, FleetMode(), version="x", interval_s=BEAT_S).beat() == 1


async def test_the_budget_falls_back_while_redis_is_frozen_and_comes_back(
    redis_server: RedisServer, clients: tuple[FleetClient, FleetClient]
) -> None:
    a, b = clients
    mode = FleetMode()
    members = Members(a, mode, version="x", interval_s=BEAT_S)
    # b beats on, so a counts it live however long the steps below take under load.
    other = Members(b, FleetMode(), version="x", interval_s=BEAT_S)
    await other.beat()
    other.start()
    members.start()
    host = RedisRateBudget("acme", 600, fleet=a, mode=mode)
    try:
        await until(lambda: mode.live_members == 2)
        ticket = await host.acquire()
        assert isinstance(ticket, SharedTicket)
        host.observe(ticket, limit=100, remaining=99, reset_s=60.0)
        while isinstance(host.try_acquire(), Ticket):
            pass  # the rest of the batch in hand: the next ticket needs Redis
        with capture_logs() as logs:
            redis_server.freeze()
            try:
                started = time.monotonic()
                # Bounded: the call times out, the host falls back and serves locally.
                ticket = await asyncio.wait_for(host.acquire(), 5.0)
                assert time.monotonic() - started < 4.0
                assert not isinstance(ticket, SharedTicket)
                assert isinstance(ticket, Ticket)
                assert mode.name == "fallback"
                # The learnt limit shared by the live members last seen (itself and b).
                assert host.view()["fallback_limit"] == 50
                assert host.local.share == 50
            finally:
                redis_server.resume()
            await until(lambda: not mode.fallback)
        events = [entry["event"] for entry in logs]
        assert events.count("fleet_fallback") == 1
        assert events.count("fleet_recovered") == 1
        # Back on Redis: tokens come from the shared budget again.
        await asyncio.sleep(0.6)  # the shared pacing allows another token
        ticket = await asyncio.wait_for(host.acquire(), 5.0)
        assert isinstance(ticket, SharedTicket)
    finally:
        await members.stop()
        await other.stop()


async def test_stop_ends_the_heartbeat_even_when_redis_py_swallows_the_cancel(
    clients: tuple[FleetClient, FleetClient],
) -> None:
    a, _ = clients
    members = Members(a, FleetMode(), version="x", interval_s=BEAT_S)
    in_call = asyncio.Event()
    swallow = [True]

    async def swallowing() -> list[int]:
        # Python 3.11's `asyncio.wait_for` in redis-py, hit by a cancel as its write completes:
        # the cancel is lost and the call returns (CPython gh-86296).
        in_call.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if swallow[0]:
                return [0, 1]
            raise
        raise AssertionError("not cancelled")

    members._script = lambda keys, args: swallowing()  # type: ignore[assignment]
    members.start()
    task = members._task
    assert task is not None
    await asyncio.wait_for(in_call.wait(), 5.0)
    stopping = asyncio.get_running_loop().create_task(members.stop())
    try:
        await asyncio.wait({stopping}, timeout=5.0)
        assert stopping.done()
        # The task ended by the cancellation, and beats no more.
        assert task.cancelled()
    finally:
        swallow[0] = False
        task.cancel()
        stopping.cancel()
        await asyncio.wait({task, stopping}, timeout=5.0)


async def test_fleet_status_lists_members_and_budgets(
    redis_server: RedisServer, clients: tuple[FleetClient, FleetClient], tmp_path: Path
) -> None:
    a, _ = clients
    await Members(a, FleetMode(), version="9.9.9", in_delivery=lambda: 2).beat()
    host = RedisRateBudget("acme", 600, fleet=a, mode=FleetMode())
    ticket = await host.acquire()
    host.observe(ticket, limit=50, remaining=0, reset_s=5.0, rate_limited=True)
    await asyncio.gather(*host._pushes)
    config = tmp_path / "forwarder.toml"
    config.write_text(
        f'[fleet]\nredis_url = "{redis_server.url}"\nkey_prefix = "fwdtest"\n', encoding="utf-8"
    )
    args = build_parser().parse_args(["fleet", "status", "--config", str(config), "--json"])
    code, out = await asyncio.to_thread(run_captured, args)
    assert code == 0
    state = json.loads(out)
    assert [m["member"] for m in state["members"]] == ["host-a"]
    assert state["members"][0]["in_delivery"] == 2
    assert state["members"][0]["version"] == "9.9.9"
    budget = state["budgets"]["acme"]
    assert budget["limit_per_window"] == 50
    assert budget["remaining"] == 0
    assert 3.0 < budget["paused_for_s"] <= 5.0
    assert budget["rate_limited"] == 1
    # The plain form says the same.
    args = build_parser().parse_args(["fleet", "status", "--config", str(config)])
    code, out = await asyncio.to_thread(run_captured, args)
    assert code == 0
    assert "host-a" in out
    assert "acme" in out
    assert "limit 50/" in out


async def test_fleet_status_without_redis_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "forwarder.toml"
    config.write_text(f'[fleet]\nredis_url = "redis://127.0.0.1:{free_port()}/0"\n', "utf-8")
    args = build_parser().parse_args(["fleet", "status", "--config", str(config)])
    code, _ = await asyncio.to_thread(run_captured, args)
    assert code == 2


def run_captured(args: argparse.Namespace) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cmd_fleet_status(args)
    return code, out.getvalue()


async def test_a_full_redis_refusing_writes_is_fallback_not_a_crash(
    redis_server: RedisServer, clients: tuple[FleetClient, FleetClient]
) -> None:
    a, _ = clients
    mode = FleetMode()
    host = RedisRateBudget("acme", 600, fleet=a, mode=mode)
    admin = redis_server.client()
    try:
        await admin.config_set("maxmemory", "1")  # noeviction: every write is refused (OOM)
        with capture_logs() as logs:
            ticket = await asyncio.wait_for(host.acquire(), 5.0)
        assert mode.fallback
        assert not isinstance(ticket, SharedTicket)
        (line,) = [entry for entry in logs if entry["event"] == "fleet_fallback"]
        assert "refused" in line["reason"]
        assert "OutOfMemoryError" in line["reason"]
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
