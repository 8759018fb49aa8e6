"""A reload of a fleet daemon (queue.mode "fleet") against a real Redis: `fleet.lease_s` and
`fleet.claim_idle_s` applied to the running leases, refused when the timings would not hold
with the running `remote.timeout_s`, and the restart-only fleet settings named as such."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from forwarder.config.schema import (
    Config,
    FleetConfig,
    IntakeConfig,
    QueueConfig,
    StateConfig,
)
from forwarder.daemon.lifecycle import Daemon
from forwarder.fleet.fleetlog import FleetLog
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.intake.accounts import Account, configured_accounts
from forwarder.ops.credentials import ApiKey, Secret
from tests.redisserver import RedisServer

PREFIX = "fwreload"
KEYS = AccountKeys(PREFIX, "default")
ACCOUNTS = configured_accounts(Config(), ApiKey(Secret("sk-reload-test-00000"), "test"), {})


def fleet_config(state: Path, server: RedisServer) -> Config:
    return Config(
        intake=IntakeConfig(http_listen="127.0.0.1:0"),
        state=StateConfig(dir=str(state)),
        queue=QueueConfig(mode="fleet"),
        fleet=FleetConfig(
            redis_url=server.url, member="web-1", key_prefix=PREFIX, partitions=1, lease_s=2.0
        ),
    )


def with_fleet(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, fleet=dataclasses.replace(config.fleet, **changes))


async def until_pttl(admin: aioredis.Redis, above_ms: int) -> int:
    """The lease's PTTL once it is above `above_ms` (the holder renewed it for longer)."""
    async with asyncio.timeout(5):
        while True:
            pttl = int(await admin.pttl(KEYS.lease(0)))
            if pttl > above_ms:
                return pttl
            await asyncio.sleep(0.02)


async def test_a_reload_applies_lease_s_and_claim_idle_s_to_the_running_leases(
    short_tmp: Path, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    base = fleet_config(short_tmp / "s", redis_server)
    answers: list[tuple[Config, dict[str, Account]]] = []
    daemon = Daemon(base, ACCOUNTS, loader=lambda: answers.pop(0))
    task = asyncio.create_task(daemon.run())
    try:
        async with asyncio.timeout(10):
            await daemon.ready.wait()
        # Held under lease_s = 2: the key never lives longer than 2 s.
        assert 0 < await until_pttl(redis_client, 0) <= 2000
        shared = daemon.log
        assert isinstance(shared, FleetLog)

        answers.append((with_fleet(base, lease_s=20.0, claim_idle_s=45.0), ACCOUNTS))
        with structlog.testing.capture_logs() as logs:
            assert await daemon.request_reload()
        (line,) = [entry for entry in logs if entry["event"] == "reloaded"]
        assert {"fleet.lease_s", "fleet.claim_idle_s"} <= set(line["changed"])
        assert "restart_needed" not in line
        # Renewed at once (not at the old round's end) for the new length, in Redis and locally.
        assert await until_pttl(redis_client, 2000) <= 20000
        assert shared.ownership.leases.lease_s == 20.0
        (lease,) = shared.ownership.held.values()
        assert lease.valid_until - time.monotonic() > 2.0
        assert shared.window.claim_idle_ms == shared.ownership.claim_idle_ms == 45000
        assert daemon.config.fleet.claim_idle_s == 45.0

        # Refused: 20 s does not exceed the running remote.timeout_s (30 s), although the file
        # lowers the timeout too: that needs a restart, so the running one is what counts.
        lowered = dataclasses.replace(base.remote, timeout_s=10.0)
        refused = with_fleet(base, claim_idle_s=20.0, lease_s=5.0)
        answers.append((dataclasses.replace(refused, remote=lowered), ACCOUNTS))
        with structlog.testing.capture_logs() as logs:
            assert not await daemon.request_reload()
        (line,) = [entry for entry in logs if entry["event"] == "reload_refused"]
        assert line["error"].startswith("fleet.claim_idle_s: must exceed remote.timeout_s (30.0)")
        assert "remote.timeout_s keep their running values" in line["error"]
        assert (daemon.config.fleet.claim_idle_s, daemon.config.fleet.lease_s) == (45.0, 20.0)
        assert shared.window.claim_idle_ms == 45000

        # The fleet's identity and layout need a restart: named, and kept.
        moved = with_fleet(
            base, lease_s=20.0, claim_idle_s=45.0, partitions=4, member="web-2", key_prefix="x"
        )
        answers.append((moved, ACCOUNTS))
        with structlog.testing.capture_logs() as logs:
            assert await daemon.request_reload()
        (line,) = [entry for entry in logs if entry["event"] == "reloaded"]
        assert line["restart_needed"] == ["fleet.member", "fleet.partitions", "fleet.key_prefix"]
        assert daemon.config.fleet == with_fleet(base, lease_s=20.0, claim_idle_s=45.0).fleet

        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        # The stop's release marks the hand-over for the new claim_idle_s.
        assert 20000 < int(await redis_client.pttl(KEYS.handover(0))) <= 45000
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
