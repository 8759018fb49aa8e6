"""What became of the fleet's events, in Redis: any host answers `GET /v1/events/{id}`.

In a shared queue the host that delivers an event (its partition's holder) is often not the
one that accepted it, and the app asks the host it sent the event to. So outcomes live beside
the streams, per account (one slot):

- `{P:A}:outcomes`, a hash: event_id → the outcome row as JSON (storage/sqlite/outcomes.py's
  `OutcomeRow`, its number left out: numbers are the accepting host's);
- `{P:A}:outcomes:at`, a sorted set: event_id scored with Redis's clock (ms) when it settled.

The settle and dead-letter scripts (streams.py) write them in the same step as `XACK` + `XDEL`
(so "settled" is never without "how"), and trim them there: outcomes older than
`state.outcome_retention_s` and past `state.outcome_max_count` per account go, a bounded number
per call, oldest first; both keys expire with the retention, so an account gone quiet leaves
nothing behind. `state.outcome_max_count = 0` keeps none. A stale holder's settle (the lease
moved on) writes nothing: the next holder's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from forwarder.fleet.connection import CALL_TIMEOUT_S
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.storage.eventstatus import StatusUnavailable
from forwarder.storage.sqlite.outcomes import OutcomeRow

# A Lua function the settle scripts define and call: KEYS `hash`, `index`; the (event_id, row)
# pairs are ARGV[first..#ARGV]. It removes at most 2 per written outcome (+16) of the expired
# or the oldest past the count, so no call does unbounded work and the set keeps up.
KEEP_LUA = """
local function keep_outcomes(hash, index, retention, max_count, first)
  if max_count <= 0 or first > #ARGV then return end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local written = 0
  for i = first, #ARGV - 1, 2 do
    redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
    redis.call('ZADD', index, now, ARGV[i])
    written = written + 1
  end
  local budget = 2 * written + 16
  local gone = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. (now - retention),
    'LIMIT', 0, budget)
  local over = redis.call('ZCARD', index) - max_count
  if over > #gone then
    -- the oldest first: they include the expired ones
    gone = redis.call('ZRANGE', index, 0, math.min(over, budget) - 1)
  end
  if #gone > 0 then
    redis.call('HDEL', hash, unpack(gone))
    redis.call('ZREM', index, unpack(gone))
  end
  redis.call('PEXPIRE', hash, retention)
  redis.call('PEXPIRE', index, retention)
end
"""


class Keep(Protocol):
    """How long outcomes are kept, and how many per account (`state.outcome_*`; the status
    book has both, set again by a reload)."""

    retention_s: float
    max_count: int


def outcome_keys(keys: AccountKeys) -> list[str]:
    """The two keys of an account's outcomes: the hash, the index."""
    return [f"{keys.tag}:outcomes", f"{keys.tag}:outcomes:at"]


def encode_row(row: OutcomeRow) -> bytes:
    """An outcome row as stored (the number left out: it is the accepting host's)."""
    return orjson.dumps((row[0], None, *row[2:]))


def decode_row(raw: bytes) -> OutcomeRow | None:
    """The row stored, or None if it is not one (written by another version)."""
    try:
        values = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != 10:
        return None
    row: OutcomeRow = tuple(values)  # (checked above: ten values)
    return row


class FleetOutcomes:
    """Looks outcomes up in Redis for the status book (`storage.eventstatus.SharedOutcomes`)."""

    def __init__(
        self,
        redis: Any,
        prefix: str,
        accounts: Callable[[], Iterable[str]],
        *,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._accounts = accounts
        self._timeout_s = timeout_s

    async def find(self, event_id: str, account: str | None) -> OutcomeRow | None:
        """The outcome of `event_id` in `account` (every configured account when None);
        `StatusUnavailable` when Redis cannot answer in time."""
        names = [account] if account is not None else sorted(set(self._accounts()))
        try:
            async with asyncio.timeout(self._timeout_s):
                for name in names:
                    raw = await self._redis.hget(
                        outcome_keys(AccountKeys(self._prefix, name))[0], event_id
                    )
                    if raw is not None:
                        return decode_row(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, frozen, refusing: the look-up cannot answer
            raise StatusUnavailable(f"redis outcomes: {type(exc).__name__}") from None
        return None
