"""A daemon in a fleet, in-process: its budgets shared, its mode shown, Redis out is no failure."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

import aiohttp
import pytest
import structlog

from forwarder.config.schema import Config, FleetConfig, IntakeConfig, StateConfig
from forwarder.daemon.lifecycle import Daemon
from forwarder.fleet.budget import RedisRateBudget
from forwarder.intake.accounts import configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from forwarder.ops.logs import Redactor
from tests.redisserver import RedisServer, free_port, running_redis

KEY = configured_accounts(Config(), ApiKey(Secret("sk-daemon-test-0000"), "test"), {})


def _config(state: Path, redis_url: str) -> Config:
    return Config(
        intake=IntakeConfig(http_listen="127.0.0.1:0"),
        state=StateConfig(dir=str(state)),
        fleet=FleetConfig(redis_url=redis_url, member="web-1", key_prefix="fwdtest"),
    )


async def _started(daemon: Daemon) -> asyncio.Task[int]:
    task = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    assert daemon.ready.is_set()
    return task


async def _get(daemon: Daemon, path: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{daemon.addresses[0]}{path}") as response,
    ):
        return await response.text()


async def _get_json(daemon: Daemon, path: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{daemon.addresses[0]}{path}") as response,
    ):
        body: dict[str, object] = await response.json()
        return body


async def test_a_fleet_daemon_shares_its_budgets_and_shows_its_mode(
    short_tmp: Path, redis_server: RedisServer
) -> None:
    daemon = Daemon(_config(short_tmp / "s", redis_server.url), KEY)
    task = await _started(daemon)
    try:
        assert daemon._dispatcher is not None
        lanes = daemon._dispatcher.lanes
        assert all(isinstance(lane.budget, RedisRateBudget) for lane in lanes.values())
        stats = await _get_json(daemon, "/v1/stats")
        assert stats["fleet"] == {
            "member": "web-1",
            "mode": "fleet",
            "live_members": 1,
            "fallbacks": 0,
            "key_prefix": "fwdtest",
            "redis_calls": stats["fleet"]["redis_calls"],  # type: ignore[index]
            "redis_errors": 0,
            "redis_seconds": stats["fleet"]["redis_seconds"],  # type: ignore[index]
            "budget_tokens_taken": 0,
        }
        ready = await _get_json(daemon, "/readyz")
        assert ready["fleet"] == {"mode": "fleet", "live_members": 1}
        metrics = await _get(daemon, "/metrics")
        assert "forwarder_fleet_mode 1.0" in metrics
        assert "forwarder_fleet_members 1.0" in metrics
        assert daemon.view.status_line().endswith(", fleet mode (1 live)")
        admin = redis_server.client()
        assert await admin.zscore("fwdtest:members", "web-1") is not None
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        # A clean stop leaves the members at once.
        assert await admin.zscore("fwdtest:members", "web-1") is None
        await admin.aclose()
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)


async def test_redis_down_at_start_is_fallback_not_a_failure(short_tmp: Path) -> None:
    daemon = Daemon(_config(short_tmp / "s", f"redis://127.0.0.1:{free_port()}/0"), KEY)
    task = await _started(daemon)
    try:
        ready = await _get_json(daemon, "/readyz")
        assert ready == {"ready": True, "fleet": {"mode": "fallback", "live_members": 1}}
        metrics = await _get(daemon, "/metrics")
        assert "forwarder_fleet_mode 0.0" in metrics
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_no_fleet_no_fleet_object(short_tmp: Path) -> None:
    daemon = Daemon(_config(short_tmp / "s", ""), KEY)
    task = await _started(daemon)
    try:
        assert "fleet" not in await _get_json(daemon, "/v1/stats")
        assert await _get_json(daemon, "/readyz") == {"ready": True}
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0


async def test_the_redis_password_is_read_from_its_file_and_redacted(short_tmp: Path) -> None:
    password = "redis-daemon-SECRET-5c4d3e2f1a0b"
    secret_file = short_tmp / "redis-password"
    secret_file.write_text(password, encoding="utf-8")
    async with running_redis(password=password) as server:
        config = _config(short_tmp / "s", server.url)
        config = dataclasses.replace(
            config,
            fleet=dataclasses.replace(config.fleet, redis_password_file=str(secret_file)),
        )
        daemon = Daemon(config, KEY)
        task = await _started(daemon)
        try:
            assert daemon.fleet is not None
            assert daemon.fleet.mode.name == "fleet"  # authenticated
            assert password in daemon.lanes.secrets()
            # What the daemon's log redactor is given scrubs it from any line.
            assert password not in str(Redactor(daemon.lanes.secrets()).scrub(f"pw={password}"))
            stats = await _get(daemon, "/v1/stats")
            assert password not in stats
        finally:
            daemon.request_stop()
            assert await asyncio.wait_for(task, 10) == 0


async def test_without_redis_py_the_start_fails_saying_how_to_install_it(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py missing: `import redis.asyncio` fails as it would without the extra.
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    daemon = Daemon(_config(short_tmp / "s", "redis://127.0.0.1:6379/0"), KEY)
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(daemon.run(), 10) == 1
    (failed,) = [entry for entry in logs if entry["event"] == "startup_failed"]
    assert "pip install 'forwarder[fleet]'" in failed["error"]
    assert "fleet.redis_url" in failed["error"]
