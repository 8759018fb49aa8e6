"""The fleet's Redis connection against a real server: password, secrecy, warnings, bounds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError, FleetConfig
from forwarder.fleet.connection import FleetClient, RedisUnavailable, connect, server_warnings
from forwarder.ops.credentials import Secret, resolve_redis_password
from tests.redisserver import RedisServer, free_port, running_redis

PASSWORD = "redis-pw-SECRET-4b3c2d1e0f9a8b7c"


def fleet(url: str) -> FleetConfig:
    return FleetConfig(redis_url=url, member="host-a", key_prefix="fwdtest")


async def test_password_from_a_file_authenticates_and_never_shows(tmp_path: Path) -> None:
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(PASSWORD + "\n", encoding="utf-8")
    async with running_redis(password=PASSWORD) as server:
        config = load_config(
            env={
                "FORWARDER_FLEET_REDIS_URL": server.url,
                "FORWARDER_FLEET_REDIS_PASSWORD_FILE": str(secret_file),
            }
        )
        password = resolve_redis_password(config, env={})
        assert password is not None
        assert password.reveal() == PASSWORD
        client = connect(config.fleet, member="host-a", password=password)
        try:
            assert await client.call("ping", client.client.ping) is True
            assert PASSWORD not in repr(client)
            assert PASSWORD not in str(client)
            assert PASSWORD not in repr(password)
            assert PASSWORD not in repr(client.client)  # redis-py's own repr
        finally:
            await client.aclose()

        # The wrong password: a clear error that names neither password.
        wrong = connect(config.fleet, member="host-a", password=Secret("x" * 16 + "wrong-one"))
        try:
            with pytest.raises(RedisUnavailable) as caught:
                await wrong.call("ping", wrong.client.ping)
            text = str(caught.value) + repr(caught.value)
            assert "x" * 16 not in text
            assert PASSWORD not in text
            assert "ping" in text
        finally:
            await wrong.aclose()


async def test_password_from_the_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "redis_password").write_text(PASSWORD, encoding="utf-8")
    config = load_config(env={"FORWARDER_FLEET_REDIS_URL": "redis://127.0.0.1:6379/0"})
    password = resolve_redis_password(config, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert password is not None
    assert password.reveal() == PASSWORD
    assert resolve_redis_password(config, env={}) is None


def test_an_unreadable_password_file_is_named_by_setting_not_path(tmp_path: Path) -> None:
    missing = tmp_path / PASSWORD  # a password pasted as the path must not be echoed
    config = load_config(
        env={
            "FORWARDER_FLEET_REDIS_URL": "redis://127.0.0.1:6379/0",
            "FORWARDER_FLEET_REDIS_PASSWORD_FILE": str(missing),
        }
    )
    with pytest.raises(ConfigError) as caught:
        resolve_redis_password(config, env={})
    assert "fleet.redis_password_file" in str(caught.value)
    assert PASSWORD not in str(caught.value)


async def test_a_durable_server_gives_no_warnings(redis_server: RedisServer) -> None:
    client = connect(fleet(redis_server.url), member="host-a", password=None)
    try:
        assert await client.check_server() == []
    finally:
        await client.aclose()


async def test_a_server_that_can_lose_or_evict_is_warned_about(redis_server: RedisServer) -> None:
    admin = redis_server.client()
    await admin.config_set("appendonly", "no")
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    await admin.aclose()
    client = connect(fleet(redis_server.url), member="host-a", password=None)
    try:
        warnings = await client.check_server()
    finally:
        await client.aclose()
    assert len(warnings) == 2
    assert "appendonly" in warnings[0]
    assert "maxmemory-policy is allkeys-lru" in warnings[1]
    assert "noeviction" in warnings[1]


def test_appendfsync_no_is_warned_about() -> None:
    settings = {"appendonly": "yes", "appendfsync": "no", "maxmemory-policy": "noeviction"}
    assert ["appendfsync" in w for w in server_warnings(settings)] == [True]
    settings["appendfsync"] = "everysec"
    assert server_warnings(settings) == []


async def test_a_server_refusing_config_is_a_warning_not_a_failure(
    redis_server: RedisServer,
) -> None:
    admin = redis_server.client()
    # A managed Redis: the default user may not run CONFIG.
    await admin.acl_setuser(
        "default",
        enabled=True,
        nopass=True,
        commands=["+@all", "-config"],
        keys=["*"],
        channels=["*"],
    )
    await admin.aclose()
    client = connect(fleet(redis_server.url), member="host-a", password=None)
    try:
        warnings = await client.check_server()
    finally:
        await client.aclose()
    assert len(warnings) == 1
    assert "refused CONFIG GET" in warnings[0]


async def test_a_server_that_is_down_fails_fast_and_clearly() -> None:
    client = connect(fleet(f"redis://127.0.0.1:{free_port()}/0"), member="host-a", password=None)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="redis ping"):
            await client.call("ping", client.client.ping)
        assert time.monotonic() - started < 2.0
        assert client.stats.errors["ping"] == 1
    finally:
        await client.aclose()


async def test_a_frozen_server_is_a_bounded_wait(redis_server: RedisServer) -> None:
    client: FleetClient = connect(
        fleet(redis_server.url), member="host-a", password=None, socket_timeout_s=0.2
    )
    try:
        assert await client.call("ping", client.client.ping) is True
        redis_server.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await client.call("ping", client.client.ping, timeout_s=1.0)
            assert time.monotonic() - started < 1.5
        finally:
            redis_server.resume()
        # Back: the next call works again (the broken connection was replaced).
        await asyncio.sleep(0.05)
        assert await client.call("ping", client.client.ping) is True
    finally:
        await client.aclose()


async def swallow_cancel(reply: str) -> str:
    """What redis-py's `asyncio.wait_for` does on Python 3.11 when a cancellation arrives just
    as the socket write it waits for completes (CPython gh-86296): return, the cancel lost."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return reply
    raise AssertionError("not cancelled")


async def test_a_cancel_swallowed_inside_a_call_still_cancels_the_caller() -> None:
    client = connect(fleet(f"redis://127.0.0.1:{free_port()}/0"), member="host-a", password=None)
    try:
        call = asyncio.get_running_loop().create_task(
            client.call("ping", lambda: swallow_cancel("PONG"))
        )
        await asyncio.sleep(0.01)  # the call is in flight
        call.cancel()
        await asyncio.wait({call}, timeout=2.0)
        assert call.cancelled()
        # The call's own timeout is no cancellation of the caller: it is RedisUnavailable.
        with pytest.raises(RedisUnavailable, match="no answer within"):
            await client.call("ping", lambda: asyncio.sleep(30), timeout_s=0.05)
    finally:
        await client.aclose()


def test_keys_of_an_account_share_one_hash_tag() -> None:
    client = FleetClient.__new__(FleetClient)
    client.prefix = "fwd"
    assert client.account_key("acme", "budget") == "{fwd:acme}:budget"
    assert client.key("members") == "fwd:members"
