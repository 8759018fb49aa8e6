"""Which partitions this member delivers from: a fair share of each account's, under leases.

Every `lease_s / 3` the member beats in `{P}:consumers` (a sorted set: member → Redis time in
ms; a member silent for `STALE_LEASES` leases is dropped from it), reads the live consumers and
the members being drained (`{P}:drain`), and works out its share: partition N of account A goes
to the live consumer at position (N + crc32(A)) mod count in name order, so every member
computes the same split without talking to the others. It renews the leases it holds, acquires
the ones of its share it lacks, and gives up the ones no longer its own once nothing of them is
in delivery (`release` hands their unsettled entries to the next holder at once). A member
named in `{P}:drain` (`forwarder fleet drain`) wants nothing; its next start ends the drain.

The consumers are a set of their own rather than the budget's `P:members`: a host with
`fleet.redis_url` but another queue.mode beats there too, and must not be given partitions.
The two keys share the hash tag `{P}`, so the one script that reads them runs on a cluster.

A lease that could not be renewed in time stops the partition here (`on_lost`) before Redis
lets another member take it (leases.py); a Redis that cannot be reached changes nothing else:
the leases run out and the others take over.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from forwarder.fleet.leases import Lease, Leases
from forwarder.fleet.queuekeys import GROUP

log = structlog.get_logger("forwarder.fleet")

# A consumer whose beat is older than this many leases is not live.
STALE_LEASES = 3
# How many of its unsettled entries a member hands over when it gives a partition up.
HAND_OVER_LIMIT = 100_000

# KEYS: consumers, drain. ARGV: member, stale ms, beat (1: beat, 0: leave the set), rejoin (1:
# a start, which ends a drain of this member). → {live members..., "", draining members...}
BEAT = """
if ARGV[4] == '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local out = redis.call('ZRANGE', KEYS[1], 0, -1)
out[#out + 1] = ''
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = name end
return out
"""


def consumers_key(prefix: str) -> str:
    """The live consumers of the shared queue (sorted set: member → last beat, Redis ms)."""
    return f"{{{prefix}}}:consumers"


def drain_key(prefix: str) -> str:
    """Members being drained (`forwarder fleet drain`): they take no partitions."""
    return f"{{{prefix}}}:drain"


def share(
    member: str, live: Iterable[str], accounts: Iterable[str], partitions: int
) -> set[tuple[str, int]]:
    """The (account, partition) pairs that are `member`'s share among the `live` consumers."""
    names = sorted(set(live))
    if member not in names:
        return set()
    mine, count = names.index(member), len(names)
    wanted: set[tuple[str, int]] = set()
    for account in accounts:
        offset = zlib.crc32(account.encode("utf-8", "surrogatepass"))
        wanted.update((account, p) for p in range(partitions) if (p + offset) % count == mine)
    return wanted


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Ownership:
    """The leases this member holds and the loop that keeps them its fair share."""

    def __init__(
        self,
        redis: Any,
        leases: Leases,
        *,
        prefix: str,
        partitions: int,
        claim_idle_ms: int,
        accounts: Callable[[], Iterable[str]],
        in_flight: Callable[[str, int], int],
        gained: Callable[[Lease], None],
        lost: Callable[[Lease], None],
    ) -> None:
        # `lost(lease)`: stop loading from the partition and take its waiting events out of the
        # window (idempotent); `in_flight`: its events in delivery or not settled in Redis yet.
        self._redis = redis
        self.leases = leases
        self.member = leases.member
        self.prefix = prefix
        self.partitions = partitions
        # Set again by a reload: the hand-over mark of the next release lives this long.
        self.claim_idle_ms = claim_idle_ms
        self._accounts = accounts
        self._in_flight = in_flight
        self._gained = gained
        self._lost = lost
        self._beat = redis.register_script(BEAT)
        self.held: dict[tuple[str, int], Lease] = {}
        self.wanted: set[tuple[str, int]] = set()
        self.live: list[str] = []
        self.draining = False  # this member is drained: it gives up its leases and takes none
        self.lost_count = 0  # leases lost (not renewed in time, or taken over)
        self._first = True  # the first round after a start ends an earlier drain of this member

    def lease(self, account: str, partition: int) -> Lease | None:
        """The lease to deliver from (account, partition) under, if this member may now."""
        lease = self.held.get((account, partition))
        if lease is None or not self.leases.valid(lease):
            return None
        return lease

    def check_expired(self) -> None:
        """Stop every partition whose lease ran out locally (no renewal came back in time)."""
        for key, lease in list(self.held.items()):
            if not self.leases.valid(lease):
                self._drop(key, lease, why="not renewed in time")

    async def tick(self) -> None:
        """One round: beat, read the live consumers, renew, acquire the share, release the rest.

        Raises what the Redis client raises; what was done before that stays done.
        """
        stale_ms = int(self.leases.lease_s * STALE_LEASES * 1000)
        answer = await self._beat(
            keys=[consumers_key(self.prefix), drain_key(self.prefix)],
            args=[self.member, stale_ms, 0 if self.draining else 1, 1 if self._first else 0],
        )
        self._first = False
        names = [_text(v) for v in answer]
        split = names.index("")
        live, drained = names[:split], set(names[split + 1 :])
        if self.member in drained and not self.draining:
            self.draining = True
            log.info("fleet_drain_started", member=self.member, partitions=len(self.held))
        self.live = [name for name in live if name not in drained]
        self.wanted = share(self.member, self.live, self._accounts(), self.partitions)
        for key, lease in list(self.held.items()):
            if not await self.leases.renew(lease):
                self._drop(key, lease, why="taken over")
        for key in sorted(self.wanted - self.held.keys()):
            got = await self.leases.acquire(*key)
            if got is not None:
                self.held[key] = got
                self._gained(got)
        for key in [k for k in self.held if k not in self.wanted]:
            self._lost(self.held[key])  # no more loading; its waiting events leave the window
            if self._in_flight(*key) == 0:
                await self.release(key)

    async def release(self, key: tuple[str, int]) -> None:
        """Give a partition up, handing its unsettled entries to the next holder at once."""
        lease = self.held.pop(key, None)
        if lease is None:
            return
        self._lost(lease)
        await self.leases.release(
            lease, group=GROUP, idle_ms=self.claim_idle_ms, limit=HAND_OVER_LIMIT
        )

    async def release_all(self) -> None:
        """At a stop: every partition given up (their entries stay pending for the next)."""
        for key in list(self.held):
            await self.release(key)
        await self._beat(
            keys=[consumers_key(self.prefix), drain_key(self.prefix)],
            args=[self.member, int(self.leases.lease_s * STALE_LEASES * 1000), 0, 0],
        )

    def _drop(self, key: tuple[str, int], lease: Lease, *, why: str) -> None:
        del self.held[key]
        self.lost_count += 1
        log.warning(
            "fleet_lease_lost",
            account=lease.account,
            partition=lease.partition,
            generation=lease.generation,
            reason=why,
        )
        self._lost(lease)
