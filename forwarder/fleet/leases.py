"""Partition leases: one live member delivers from a partition at a time.

A lease is the key `{P:A}:lease:N` holding "MEMBER GENERATION" with a PX expiry. Acquiring it
is one script (`SET` only if free or already this member's, and the generation `INCR`ed in the
same step), so every new holder has a higher generation than the last. Renewing and releasing
act only if the key still holds this holder's "MEMBER GENERATION"; every settle checks the same
value in its own script (streams.py), so a holder that lost its lease cannot ack (fencing).

The lease never waits on a lock without an expiry (the taskiq-redis bug where a SIGKILLed
worker's lock blocked reclaims forever): a dead holder's lease simply runs out.

The holder stops delivering from a partition before Redis lets the lease go: `valid_until` is
the renew's *send* time on this host's monotonic clock plus lease_s minus a margin. Redis starts
its PX timer when it runs the command, which is later than the send, so the local deadline is
always the earlier one; the margin covers a clock that runs at a different rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forwarder.fleet.queuekeys import AccountKeys

# The local deadline ends this share of lease_s early (at least MIN_MARGIN_S).
MARGIN_SHARE = 0.1
MIN_MARGIN_S = 0.1

# KEYS: lease, generation, hand-over mark. ARGV: member, lease ms.
# → {generation, "", clean} or {0, current holder, 0}; clean is 1 when the last holder released
# the partition (its mark still there) or there was none: nothing of it can be in flight.
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder = string.match(cur, '^(%S+) ')
  if holder ~= ARGV[1] then return {0, cur, 0} end
end
local gen = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. gen, 'PX', ARGV[2])
local clean = 0
if redis.call('DEL', KEYS[3]) == 1 or gen == 1 then clean = 1 end
return {gen, '', clean}
"""

# KEYS: lease. ARGV: "MEMBER GEN", lease ms. → 1 renewed, 0 not ours any more.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease, stream, hand-over mark. ARGV: "MEMBER GEN", group, member, idle ms, max entries.
# Our unsettled entries are marked idle for idle ms, so the next holder claims them at once
# instead of waiting fleet.claim_idle_s: we hand them over, nothing of ours is in flight.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local handed = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local ok, rows = pcall(redis.call, 'XPENDING', KEYS[2], ARGV[2], '-', '+', ARGV[5], ARGV[3])
  if ok then
    -- XCLAIM key group member 0 id... IDLE ms JUSTID (unpack() only expands last in a call)
    local argv = {KEYS[2], ARGV[2], ARGV[3], 0}
    for _, row in ipairs(rows) do argv[#argv + 1] = row[1] end
    handed = #rows
    if handed > 0 then
      argv[#argv + 1] = 'IDLE'
      argv[#argv + 1] = ARGV[4]
      argv[#argv + 1] = 'JUSTID'
      redis.call('XCLAIM', unpack(argv))
    end
  end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
return handed
"""


@dataclass(slots=True)
class Lease:
    """A partition this member holds, as this host sees it."""

    account: str
    partition: int
    member: str
    generation: int
    valid_until: float  # monotonic: deliver from the partition only before this
    # Taken from a holder that released it (or from none): nothing of an earlier holder can be
    # in flight, so its entries are taken over at once instead of after fleet.claim_idle_s.
    clean: bool = True

    @property
    def token(self) -> str:
        """The lease key's value while this lease holds: "MEMBER GENERATION"."""
        return f"{self.member} {self.generation}"


class Leases:
    """Acquire, renew and release partition leases of one member."""

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str,
        member: str,
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.member = member
        self.set_lease_s(lease_s)
        self._clock = clock
        self._acquire = redis.register_script(ACQUIRE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    def set_lease_s(self, lease_s: float) -> None:
        """The lease's length from the next acquisition or renewal on (a reload). A lease held
        now keeps its local deadline until then: Redis holds it at least that long, so a
        shorter new length cannot leave this host delivering past the lease in Redis."""
        self.lease_s = lease_s
        self._lease_ms = max(1, int(lease_s * 1000))
        self._margin = max(MIN_MARGIN_S, lease_s * MARGIN_SHARE)

    def _deadline(self, sent_at: float) -> float:
        return sent_at + self.lease_s - self._margin

    async def acquire(self, account: str, partition: int) -> Lease | None:
        """Take the partition's lease if it is free (or ours); None: another member holds it."""
        keys = AccountKeys(self._prefix, account)
        sent_at = self._clock()
        gen, _holder, clean = await self._acquire(
            keys=[keys.lease(partition), keys.generation(partition), keys.handover(partition)],
            args=[self.member, self._lease_ms],
        )
        if not gen:
            return None
        deadline = self._deadline(sent_at)
        return Lease(account, partition, self.member, int(gen), deadline, bool(clean))

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False: it is not ours any more (the caller stops at once)."""
        keys = AccountKeys(self._prefix, lease.account)
        sent_at = self._clock()
        ok = await self._renew(
            keys=[keys.lease(lease.partition)], args=[lease.token, self._lease_ms]
        )
        if ok:
            lease.valid_until = self._deadline(sent_at)
            return True
        lease.valid_until = 0.0
        return False

    async def release(self, lease: Lease, *, group: str, idle_ms: int, limit: int) -> int:
        """Give the lease up, handing our unsettled entries (up to `limit`) to the next holder
        at once; returns how many were handed over, -1 if the lease was no longer ours."""
        keys = AccountKeys(self._prefix, lease.account)
        lease.valid_until = 0.0
        return int(
            await self._release(
                keys=[
                    keys.lease(lease.partition),
                    keys.stream(lease.partition),
                    keys.handover(lease.partition),
                ],
                args=[lease.token, group, self.member, idle_ms, max(1, limit)],
            )
        )

    def valid(self, lease: Lease) -> bool:
        """Whether this host may still deliver from the lease's partition."""
        return self._clock() < lease.valid_until
