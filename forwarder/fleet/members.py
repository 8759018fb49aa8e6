"""The fleet's members: this host's heartbeat, and who is live.

Every `HEARTBEAT_S` a kept task writes this host's name into `P:members` (a sorted set scored
with Redis's clock, in ms: hosts' clocks never meet) and its details into `P:member:NAME`
(started_ms, mode, version, in_delivery). A member is live while its last heartbeat is at most
`LIVE_BEATS` heartbeats old; the count (this host included) is what a budget divides the learnt
limit by in fallback. Members silent for `FORGET_S` are dropped from the set; a clean stop
removes this host at once.

The heartbeat is also the fleet's probe: it keeps calling Redis while the host is in fallback,
and its first success brings the host back (`FleetMode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import structlog

from forwarder.fleet.connection import CALL_TIMEOUT_S, FleetClient, RedisUnavailable, as_text
from forwarder.fleet.mode import FleetMode

log = structlog.get_logger("forwarder.fleet")

HEARTBEAT_S = 1.0
# A member is live while seen within this many heartbeats (one late beat is not a death).
LIVE_BEATS = 3
# A member's entry outlives its last heartbeat by this long (for `forwarder fleet status`).
FORGET_S = 3600.0
# `stop` waits this long for the heartbeat task to end (a call in flight ends within its bound).
STOP_WAIT_S = CALL_TIMEOUT_S

HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
return {now, redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[2]), '+inf')}
"""


def live_ms(interval_s: float = HEARTBEAT_S) -> int:
    """How old a member's last heartbeat may be for it to count as live, in ms."""
    return round(interval_s * LIVE_BEATS * 1000)


class Members:
    """This host's heartbeat in `P:members`, run by a kept task (`start` / `stop`)."""

    def __init__(
        self,
        fleet: FleetClient,
        mode: FleetMode,
        *,
        version: str,
        in_delivery: Callable[[], int] = lambda: 0,
        interval_s: float = HEARTBEAT_S,
    ) -> None:
        self._fleet = fleet
        self._mode = mode
        self._version = version
        self._in_delivery = in_delivery
        self._interval = interval_s
        self._script = fleet.client.register_script(HEARTBEAT_LUA)
        self._task: asyncio.Task[None] | None = None
        self.started_ms = 0  # Redis time of the first heartbeat
        self.beats = 0

    @property
    def set_key(self) -> str:
        """`P:members`."""
        return self._fleet.key("members")

    @property
    def member_key(self) -> str:
        """`P:member:NAME`."""
        return self._fleet.key(f"member:{self._fleet.member}")

    async def beat(self) -> int:
        """One heartbeat; returns the live members (this one included). `RedisUnavailable`."""
        args: list[str | int] = [
            self._fleet.member,
            live_ms(self._interval),
            round(FORGET_S * 1000),
        ]
        now, live = await self._fleet.call(
            "heartbeat", lambda: self._script(keys=[self.set_key], args=args)
        )
        if not self.started_ms:
            self.started_ms = int(now)
        details: dict[Any, Any] = {
            "started_ms": self.started_ms,
            "mode": self._mode.name,
            "version": self._version,
            "in_delivery": self._in_delivery(),
        }

        async def write() -> Any:
            pipe = self._fleet.client.pipeline(transaction=False)
            pipe.hset(self.member_key, mapping=details)
            pipe.pexpire(self.member_key, round(FORGET_S * 1000))
            return await pipe.execute()

        await self._fleet.call("member", write)
        self.beats += 1
        return int(live)

    async def run(self) -> None:
        """Beat until cancelled; a failed beat puts the host in fallback, a good one back."""
        while True:
            try:
                live = await self.beat()
            except RedisUnavailable as exc:
                self._mode.lost(str(exc))
            else:
                self._mode.seen(live)
                self._mode.back()
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        """Start the heartbeat task (kept here, cancelled by `stop`)."""
        self._task = asyncio.get_running_loop().create_task(self.run(), name="fleet-heartbeat")

    async def stop(self) -> None:
        """Stop beating and leave the set, so the others count one member fewer at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancelled beat ends within its call's bound (FleetClient.call).
            await asyncio.wait({task}, timeout=STOP_WAIT_S)
            if not task.done():
                task.cancel()  # once more, not waited for: the daemon's stop goes on
            elif not task.cancelled():
                task.result()  # `run` ends only by cancellation: anything else is raised
        if not self._mode.fallback:
            with contextlib.suppress(RedisUnavailable):
                member = self._fleet.member
                await self._fleet.call(
                    "leave", lambda: self._fleet.client.zrem(self.set_key, member), timeout_s=1.0
                )


async def read_members(fleet: FleetClient, interval_s: float = HEARTBEAT_S) -> list[dict[str, Any]]:
    """Every member in `P:members`: name, seconds since its heartbeat, live, and its details."""
    client = fleet.client
    seconds, micros = await fleet.call("time", client.time)
    now = int(seconds) * 1000 + int(micros) // 1000
    entries: Any = await fleet.call(
        "members", lambda: client.zrange(fleet.key("members"), 0, -1, withscores=True)
    )
    found = []
    for raw_name, score in entries:
        name = as_text(raw_name)
        key = fleet.key(f"member:{name}")
        details = await fleet.call("member", functools.partial(client.hgetall, key))
        info = {as_text(k): as_text(v) for k, v in details.items()}
        age_s = max(0.0, (now - float(score)) / 1000)
        found.append(
            {
                "member": name,
                "last_heartbeat_s": round(age_s, 3),
                "live": age_s * 1000 <= live_ms(interval_s),
                "mode": info.get("mode", ""),
                "version": info.get("version", ""),
                "in_delivery": int(info.get("in_delivery", "0") or 0),
                "started_ms": int(info.get("started_ms", "0") or 0),
            }
        )
    return found
