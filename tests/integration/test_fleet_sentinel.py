"""Fleet mode through Sentinel: a real master, replica and `redis-server --sentinel`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog

from forwarder.config.schema import Config, FleetConfig
from forwarder.fleet.budget import RedisRateBudget, SharedTicket
from forwarder.fleet.connection import FleetClient, RedisUnavailable, connect
from forwarder.fleet.host import FleetHost
from forwarder.fleet.mode import FleetMode
from forwarder.ops.credentials import Secret
from tests.conftest import TlsFiles
from tests.redisserver import RedisServer, running_sentinel

PASSWORD = "redis-pw-SECRET-sentinel-5e6f7a8b"
SENTINEL_PASSWORD = "sentinel-own-SECRET-9c8d7e6f5a4b"
ACCOUNT = "acme"
KEY = "{fwdtest:acme}:budget"


def fleet(url: str) -> FleetConfig:
    return FleetConfig(redis_url=url, member="host-a", key_prefix="fwdtest")


async def take_token(client: FleetClient) -> None:
    # A fresh budget holds no tokens: acquire runs the budget script on the master.
    ticket = await RedisRateBudget(ACCOUNT, 6000, fleet=client, mode=FleetMode()).acquire()
    assert isinstance(ticket, SharedTicket)


async def role(server: RedisServer) -> str:
    client = server.client()
    try:
        return str((await client.info("replication"))["role"])
    finally:
        await client.aclose()


async def test_budget_tokens_through_sentinel_reach_the_new_master_after_a_failover() -> None:
    # The Sentinel has a requirepass of its own: every question to it carries that password.
    async with running_sentinel(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD) as group:
        client = connect(
            fleet(group.url),
            member="host-a",
            password=Secret(PASSWORD),
            sentinel_password=Secret(SENTINEL_PASSWORD),
        )
        try:
            master: Any = client.client
            shown = repr(client) + repr(master) + repr(master._fleet_sentinels)
            assert PASSWORD not in shown
            assert SENTINEL_PASSWORD not in shown
            assert await client.check_server() == []
            await take_token(client)
            master = group.master.client()
            try:
                assert await master.exists(KEY) == 1
                await master.delete(KEY)
                # The replica has it too before the failover: the delete reached it.
                await master.wait(1, 5000)
            finally:
                await master.aclose()

            await group.failover()
            assert await role(group.replica) == "master"

            # The pooled connection to the dead master fails; redis-py's retry reconnects,
            # asking the Sentinel where the master is now: the very next call succeeds.
            await take_token(client)
            promoted = group.replica.client()
            try:
                # Written on the promoted replica: the client followed the Sentinel.
                assert await promoted.exists(KEY) == 1
            finally:
                await promoted.aclose()
        finally:
            await client.aclose()


async def test_an_unknown_master_name_is_a_clear_unavailable() -> None:
    async with running_sentinel() as group:
        url = group.url.replace("/fwdmaster/", "/nosuchmaster/")
        client = connect(fleet(url), member="host-a", password=None)
        try:
            with pytest.raises(RedisUnavailable) as caught:
                await client.call("ping", client.client.ping)
            assert "ping" in str(caught.value)
        finally:
            await client.aclose()


async def test_the_acl_user_before_the_sentinels_logs_in_to_the_master() -> None:
    async with running_sentinel() as group:
        master = group.master.client()
        try:
            await master.acl_setuser(
                "fwduser", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@all"]
            )
        finally:
            await master.aclose()
        url = group.url.replace("redis+sentinel://", "redis+sentinel://fwduser@")
        client = connect(fleet(url), member="host-a", password=Secret(PASSWORD))
        try:
            assert await client.call("whoami", client.client.acl_whoami) in ("fwduser", b"fwduser")
        finally:
            await client.aclose()


async def test_rediss_sentinel_speaks_tls_to_the_sentinel_and_the_master(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The system trust store, as in production, made to hold the test CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    async with running_sentinel(tls=(tls_files.ca, tls_files.cert, tls_files.key)) as group:
        assert group.url.startswith("rediss+sentinel://")
        client = connect(fleet(group.url), member="host-a", password=None)
        try:
            # Both the Sentinel's and the master's ports speak TLS only: a plain connection
            # to either fails.
            await take_token(client)
            pool: Any = client.client.connection_pool
            assert await pool.get_master_address() == ("127.0.0.1", group.tls_ports["master"])
        finally:
            await client.aclose()


async def start_host(url: str, password_file: Path | None) -> tuple[FleetHost, str]:
    """A fleet host on `url` with the Sentinel password from `password_file`; its log lines."""
    config = Config(
        fleet=FleetConfig(
            redis_url=url,
            member="host-a",
            key_prefix="fwdtest",
            sentinel_password_file=str(password_file or ""),
        )
    )
    with structlog.testing.capture_logs() as logs:
        host = await FleetHost.start(config, in_delivery=lambda: 0)
        await host.stop()
    return host, repr(logs)


async def test_a_missing_or_wrong_sentinel_password_is_a_fallback_that_says_why(
    tmp_path: Path,
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-sentinel-SECRET-1234567890\n", encoding="utf-8")
    right = tmp_path / "right"
    right.write_text(SENTINEL_PASSWORD + "\n", encoding="utf-8")
    async with running_sentinel(sentinel_password=SENTINEL_PASSWORD) as group:
        host, logs = await start_host(group.url, None)
        assert host.mode.name == "fallback"
        assert "fleet_sentinel_auth_failed" in logs
        assert "asks for a password: set fleet.sentinel_password_file" in logs

        host, logs = await start_host(group.url, wrong)
        assert host.mode.name == "fallback"
        assert "refused the Sentinel password" in logs
        assert "not-the-sentinel-SECRET" not in logs

        host, logs = await start_host(group.url, right)
        assert host.mode.name == "fleet"
        assert "fleet_sentinel_auth_failed" not in logs
        assert host.secrets() == [SENTINEL_PASSWORD]  # handed to the log redactor
        assert SENTINEL_PASSWORD not in logs
