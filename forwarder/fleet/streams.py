"""The partitions' streams: append, read in order, claim a dead member's entries, settle fenced.

One stream entry is one event (field `e`: the event as a JSON array, the spool's entry form),
so each event is acknowledged on its own. Appends of one request go in one script per account
(`APPEND`: all of its keys share one slot, so it runs on a Redis Cluster with any redis-py,
whose cluster pipeline had no MULTI before 6.x), so a request is stored whole or not at all,
and the caller answers intake only after Redis acknowledged it.

Settling is one script: the partition's lease must still hold "MEMBER GENERATION", then `XACK`
and `XDEL` together. A stale holder's settle is refused (and counted by the caller); `XDEL`
beside `XACK` keeps the stream from growing without end (an acked entry is not removed by
`XACK`, the faststream and taskiq-redis leak). Dead letters move to the account's `dead` stream
in the same fenced way. Both scripts also keep the events' outcomes for `GET /v1/events/{id}`
on any host (outcomes.py).

A partition's consumer group is created on first need (`XGROUP CREATE ... 0 MKSTREAM`), and a
`NOGROUP` answer (the stream deleted, a Redis restarted without its AOF) creates it again.

Taking a partition over claims the other members' pending entries with `XPENDING` + `XCLAIM`
(never `XAUTOCLAIM`, which also re-hands this member's own entries, already in its window);
when is the window's call (window.py). No claim waits on a lock without an expiry (the
taskiq-redis bug): the partition's lease, which expires, decides who claims.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from forwarder.events import Event
from forwarder.fleet.leases import Lease
from forwarder.fleet.outcomes import KEEP_LUA, Keep, outcome_keys
from forwarder.fleet.queuekeys import GROUP, AccountKeys, accounts_key
from forwarder.storage.sqlite.codec import event_from_entry

FIELD = b"e"
# Pending entries of a partition looked at per claim (a few windows' worth at most).
PENDING_SCAN = 10_000
# Ids per settle script call: Lua's unpack() has a stack limit of a few thousand values.
SETTLE_CHUNK = 500

# KEYS: the stream of each entry, in order (repeats allowed). ARGV: field, then each entry's
# value. → the new ids. Every key is checked before the first write, so a key of another type
# fails the whole script with nothing written; an out-of-memory server refuses the first XADD,
# before anything is written (Redis checks memory at a script's first write only): all or none.
APPEND = """
for i = 1, #KEYS do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'stream' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE a partition key holds no stream')
  end
end
local ids = {}
for i = 1, #KEYS do
  ids[i] = redis.call('XADD', KEYS[i], '*', ARGV[1], ARGV[i + 1])
end
return ids
"""

# KEYS: lease, stream, outcomes, outcomes:at. ARGV: "MEMBER GEN", group, n, retention_ms,
# max_count, n ids, then (event_id, outcome row) pairs → acked count, or -1 (not our lease).
SETTLE = (
    KEEP_LUA
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[3])
local acked = redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 6, 5 + n))
redis.call('XDEL', KEYS[2], unpack(ARGV, 6, 5 + n))
keep_outcomes(KEYS[3], KEYS[4], tonumber(ARGV[4]), tonumber(ARGV[5]), 6 + n)
return acked
"""
)

# KEYS: lease, stream, dead, outcomes, outcomes:at. ARGV: "MEMBER GEN", group, id,
# retention_ms, max_count, n (2 per field), field, value, ..., then (event_id, row) → 1, or -1.
DEAD_LETTER = (
    KEEP_LUA
    + """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[6])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 7, 6 + n))
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
keep_outcomes(KEYS[4], KEYS[5], tonumber(ARGV[4]), tonumber(ARGV[5]), 7 + n)
return 1
"""
)


class Entry(NamedTuple):
    """An event read from a partition's stream."""

    partition: int
    entry_id: bytes
    event: Event | None  # None: the entry does not hold an event (damaged)
    raw: bytes  # the entry's field as stored


def encode_event(event: Event) -> bytes:
    """The stream form of an event: the spool's entry array (see storage/sqlite/file.py)."""
    return orjson.dumps(
        (
            event.event_id,
            event.recipient_id,
            event.name,
            event.value,
            event.conversion,
            event.data,
            event.ref,
            event.accepted_at,
            event.account,
        )
    )


def decode_event(raw: bytes) -> Event | None:
    """The event a stream entry holds, or None if it holds none."""
    try:
        return event_from_entry(orjson.loads(raw))
    except (ValueError, orjson.JSONDecodeError):
        return None


def _is_nogroup(exc: Exception) -> bool:
    return str(exc).startswith("NOGROUP")


class Streams:
    """One member's reads and writes of the partitions' streams."""

    def __init__(self, redis: Any, *, prefix: str, member: str, keep: Keep | None = None) -> None:
        self._redis = redis
        # Outcomes kept for GET /v1/events/{id} (fleet/outcomes.py), read at each settle (a
        # reload changes them); None: none kept.
        self.keep = keep
        self.prefix = prefix
        self.member = member
        self._append = redis.register_script(APPEND)
        self._settle = redis.register_script(SETTLE)
        self._dead_letter = redis.register_script(DEAD_LETTER)
        self._known_accounts: set[str] = set()

    def keys(self, account: str) -> AccountKeys:
        """The keys of `account`."""
        return AccountKeys(self.prefix, account)

    # -- intake -----------------------------------------------------------------------------

    async def append(self, account: str, entries: Sequence[tuple[int, bytes]]) -> list[bytes]:
        """Add (partition, encoded event) entries of one account, all or none, in order; returns
        their ids once Redis acknowledged the transaction."""
        keys = self.keys(account)
        if account not in self._known_accounts:
            await self._redis.sadd(accounts_key(self.prefix), account)
            self._known_accounts.add(account)
        if not entries:
            return []
        ids: list[bytes] = await self._append(
            keys=[keys.stream(partition) for partition, _raw in entries],
            args=[FIELD, *(raw for _partition, raw in entries)],
        )
        return ids

    # -- delivery ---------------------------------------------------------------------------

    async def ensure_group(self, account: str, partition: int) -> None:
        """Create the partition's consumer group (and stream) unless it exists."""
        try:
            await self._redis.xgroup_create(
                self.keys(account).stream(partition), GROUP, id="0", mkstream=True
            )
        except Exception as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def read(
        self,
        account: str,
        partition: int,
        count: int,
        *,
        pending: bool = False,
        after: bytes = b"0",
    ) -> list[Entry]:
        """Up to `count` entries of the partition in stream order: new ones (handed to this
        member), or with `pending` those already handed to it, unsettled, with ids after
        `after`."""
        stream = self.keys(account).stream(partition)
        start: str | bytes = after if pending else ">"
        try:
            answer = await self._redis.xreadgroup(GROUP, self.member, {stream: start}, count=count)
        except Exception as exc:
            if not _is_nogroup(exc):
                raise
            await self.ensure_group(account, partition)
            answer = await self._redis.xreadgroup(GROUP, self.member, {stream: start}, count=count)
        return [
            self._entry(partition, entry_id, fields)
            for _stream, rows in answer or ()
            for entry_id, fields in rows
        ]

    async def read_new(self, account: str, partitions: Sequence[int], count: int) -> list[Entry]:
        """New entries of several partitions of one account in one call (one slot), up to
        `count` of each, each partition's in stream order."""
        keys = self.keys(account)
        streams = {keys.stream(p): ">" for p in partitions}
        by_stream = {keys.stream(p).encode(): p for p in partitions}
        try:
            answer = await self._redis.xreadgroup(GROUP, self.member, streams, count=count)
        except Exception as exc:
            if not _is_nogroup(exc):
                raise
            for p in partitions:
                await self.ensure_group(account, p)
            answer = await self._redis.xreadgroup(GROUP, self.member, streams, count=count)
        return [
            self._entry(by_stream[stream], entry_id, fields)
            for stream, rows in answer or ()
            for entry_id, fields in rows
        ]

    async def claim_others(self, account: str, partition: int, count: int) -> list[Entry]:
        """Take over up to `count` entries other members were handed and left unsettled, in
        stream order whatever their idle time (the caller waits until none of theirs can be in
        flight); this member's own pending entries are left alone (they are in its window)."""
        stream = self.keys(account).stream(partition)
        try:
            rows = await self._redis.xpending_range(stream, GROUP, "-", "+", PENDING_SCAN)
        except Exception as exc:
            if not _is_nogroup(exc):
                raise
            await self.ensure_group(account, partition)
            return []
        mine = self.member.encode()
        ids = [
            row["message_id"]
            for row in rows
            if (row["consumer"] if isinstance(row["consumer"], bytes) else row["consumer"].encode())
            != mine
        ][:count]
        if not ids:
            return []
        claimed = await self._redis.xclaim(stream, GROUP, self.member, 0, ids)
        return [self._entry(partition, entry_id, fields) for entry_id, fields in claimed]

    async def pending_of_others(self, account: str, partition: int) -> int:
        """How many of the partition's handed-out entries other members have not settled."""
        try:
            summary = await self._redis.xpending(self.keys(account).stream(partition), GROUP)
        except Exception as exc:
            if not _is_nogroup(exc):
                raise
            return 0
        mine = self.member.encode()
        total = int(summary["pending"])
        for consumer in summary.get("consumers") or ():
            name = consumer["name"]
            if (name.encode() if isinstance(name, str) else name) == mine:
                total -= int(consumer["pending"])
        return total

    async def settle(
        self,
        lease: Lease,
        entry_ids: Iterable[bytes],
        outcomes: Sequence[tuple[str, bytes] | None] = (),
    ) -> int:
        """Acknowledge and delete delivered entries if the lease still holds, and keep their
        outcomes (`outcomes[i]`: entry i's (event_id, encoded row), or None); returns how many
        were acknowledged, or -1 when the lease is not ours any more (nothing acknowledged)."""
        keys = self.keys(lease.account)
        ids = list(entry_ids)
        acked = 0
        for start in range(0, len(ids), SETTLE_CHUNK):
            chunk = ids[start : start + SETTLE_CHUNK]
            kept = self._kept(outcomes[start : start + SETTLE_CHUNK])
            n = int(
                await self._settle(
                    keys=[
                        keys.lease(lease.partition),
                        keys.stream(lease.partition),
                        *outcome_keys(keys),
                    ],
                    args=[lease.token, GROUP, len(chunk), *self._limits(), *chunk, *kept],
                )
            )
            if n < 0:
                return -1
            acked += n
        return acked

    async def dead_letter(
        self,
        lease: Lease,
        entry_id: bytes,
        fields: dict[str, str],
        outcome: tuple[str, bytes] | None = None,
    ) -> bool:
        """Move an entry to the account's dead letters if the lease still holds, keeping its
        outcome (event_id, encoded row) if given."""
        keys = self.keys(lease.account)
        flat: list[str | bytes] = []
        for name, value in fields.items():
            flat += [name, value]
        done = await self._dead_letter(
            keys=[
                keys.lease(lease.partition),
                keys.stream(lease.partition),
                keys.dead,
                *outcome_keys(keys),
            ],
            args=[
                lease.token, GROUP, entry_id, *self._limits(), len(flat), *flat,
                *self._kept([outcome]),
            ],
        )  # fmt: skip
        return int(done) == 1

    def _limits(self) -> tuple[int, int]:
        keep = self.keep
        return (0, 0) if keep is None else (round(keep.retention_s * 1000), keep.max_count)

    def _kept(self, outcomes: Iterable[tuple[str, bytes] | None]) -> list[str | bytes]:
        if self.keep is None or self.keep.max_count <= 0:
            return []
        return [part for pair in outcomes if pair is not None for part in pair]

    @staticmethod
    def _entry(partition: int, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Entry:
        raw = (fields or {}).get(FIELD, b"")
        return Entry(partition, entry_id, decode_event(raw) if raw else None, raw)
