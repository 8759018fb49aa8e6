"""The window of a fleet member: events of the partitions it holds, in the lanes' queue, and
their settling in Redis.

A partition this member just acquired is read in three phases, so a recipient's events go out
in stream order across a hand-over: first the entries handed to this member before (a restart
under the same name: `XREADGROUP` from id 0), then every entry other members left unsettled,
in stream order (`XPENDING` + `XCLAIM`, never this member's own: `XAUTOCLAIM` would hand back
entries already in its window), at once after a clean hand-over (leases.py) and otherwise
`fleet.claim_idle_s` after the acquisition, and only when no other member holds any of the
partition's entries, new ones (`XREADGROUP >`, every held partition of an account in one call).

Each loaded event gets a handle, the `spool_seq` the lanes give back with its outcome; the
settle (`XACK` + `XDEL`, fenced by the lease it was read under) is batched and sent by the
flush loop, so a delivered event costs the lanes no Redis round trip. A settle refused because
the lease moved on is counted (`stale_settles`): the next holder delivers the entry again, and
the remote answers 409 to the repeat (the idempotency key).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.fleet.leases import Lease
from forwarder.fleet.streams import Entry, Streams
from forwarder.storage.queue import EventQueue

PENDING, CLAIMING, NEW = "pending", "claiming", "new"
# Entries read from one partition in one call.
BATCH = 500
# At most this many of a partition's events in this host's window (loaded, no outcome yet): a
# host does not hoard what another could deliver, and a stop's drain has little to finish.
PARTITION_WINDOW = 64
# How often a partition waiting for another member's entries to go idle looks again.
CLAIM_RETRY_S = 0.5


@dataclass(slots=True, eq=False)
class _Part:
    """One held partition, as this window reads it."""

    lease: Lease
    phase: str = PENDING
    after: bytes = b"0"  # the last own pending entry loaded (phase PENDING)
    loading: bool = True
    in_window: int = 0  # loaded, no outcome yet
    unflushed: int = 0  # outcome known, not settled in Redis yet
    next_claim_at: float = 0.0
    claim_all_at: float = 0.0  # from then on every other member's entry is claimed, in order


@dataclass(slots=True)
class _Loaded:
    part: _Part
    entry_id: bytes
    ref: int  # id() of the event, the key of `_handle_of`


@dataclass(slots=True)
class WindowCounters:
    """What the window did, for the metrics and `/v1/stats`."""

    loaded: int = 0
    claimed: int = 0
    settled: int = 0
    dead_lettered: int = 0
    stale_settles: int = 0  # settles refused: the lease had moved on (fencing)
    fenced: int = 0  # events taken back from a lane before an attempt: the lease had moved on


# A dead letter waiting for the flush: its partition, lease, entry, fields and outcome.
_Dead = tuple[_Part, Lease, bytes, dict[str, str], tuple[str, bytes] | None]


@dataclass(slots=True)
class _Settles:
    lease: Lease
    part: _Part
    ids: list[bytes] = field(default_factory=list)
    # Aligned with `ids`: the event's (event_id, encoded outcome row) to keep, or None.
    outcomes: list[tuple[str, bytes] | None] = field(default_factory=list)


class FleetWindow:
    """Loads the held partitions' events into the queue and settles them (module docstring)."""

    def __init__(
        self,
        streams: Streams,
        queue: EventQueue,
        *,
        claim_idle_ms: int,
        valid: Callable[[Lease], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._streams = streams
        self._queue = queue
        # Set again by a reload: partitions acquired from then on wait this long.
        self.claim_idle_ms = claim_idle_ms
        self._valid = valid
        self._clock = clock
        self._parts: dict[tuple[str, int], _Part] = {}
        self._loaded: dict[int, _Loaded] = {}
        self._handle_of: dict[int, int] = {}  # id() of a loaded event → its handle
        self._handles = itertools.count(1)
        self._settles: dict[int, _Settles] = {}  # by id() of the lease
        self._dead: list[_Dead] = []
        self.counters = WindowCounters()
        self.member = streams.member
        # False once the daemon stops: entries read after that stay pending in Redis (handed to
        # the next holder at the release) instead of entering a window that is draining.
        self.loading = True

    # -- ownership's callbacks ----------------------------------------------------------------

    def gained(self, lease: Lease) -> None:
        """A partition was acquired: read it from the start of what is ours. Taken over from a
        holder that did not release it, the others' entries are claimed only once
        fleet.claim_idle_s has passed: that holder stopped before its lease ended, and a request
        it had sent by then has had its answer (claim_idle_s > remote.timeout_s)."""
        part = _Part(lease)
        if not lease.clean:
            part.claim_all_at = self._clock() + self.claim_idle_ms / 1000
        self._parts[(lease.account, lease.partition)] = part

    def stopped(self, lease: Lease) -> None:
        """Stop loading from the partition and take its waiting events out of the window (its
        events in delivery finish; their settles are fenced by the lease)."""
        key = (lease.account, lease.partition)
        part = self._parts.get(key)
        if part is None or part.lease is not lease or not part.loading:
            return
        part.loading = False
        taken = self._queue.take_account_spooled(lease.account)
        keep: list[tuple[Event, int]] = []
        for event, handle in taken:
            loaded = self._loaded.get(handle)
            if loaded is not None and loaded.part is part:
                del self._loaded[handle]
                self._handle_of.pop(loaded.ref, None)
                part.in_window -= 1
            else:
                keep.append((event, handle))
        if keep:
            self._queue.restore([e for e, _ in keep], [h for _, h in keep])
        self._forget_if_idle(key, part)

    def in_flight(self, account: str, partition: int) -> int:
        """The partition's events in delivery or not settled in Redis yet."""
        part = self._parts.get((account, partition))
        return 0 if part is None else part.in_window + part.unflushed

    # -- the lanes' outcomes --------------------------------------------------------------------

    def _outcome(self, handle: int) -> _Loaded | None:
        """The loaded entry `handle` names, now waiting to be written to Redis."""
        loaded = self._loaded.pop(handle, None)
        if loaded is not None:
            self._handle_of.pop(loaded.ref, None)
            loaded.part.in_window -= 1
            loaded.part.unflushed += 1
        return loaded

    def may_deliver(self, event: Event) -> bool:
        """Whether a lane may still send `event`: its partition is still held here under the
        lease it was read with. If not, the event leaves the window without an outcome (its
        entry stays pending in Redis for the partition's holder) and is counted."""
        handle = self._handle_of.get(id(event))
        if handle is None:
            return True  # not one of the window's (nothing to fence)
        loaded = self._loaded.get(handle)
        if loaded is not None:
            part = loaded.part
            key = (part.lease.account, part.lease.partition)
            if part.loading and self._valid(part.lease) and self._parts.get(key) is part:
                return True
            del self._loaded[handle]
            part.in_window -= 1
            self._forget_if_idle(key, part)
        del self._handle_of[id(event)]
        self.counters.fenced += 1
        return False

    def settle(self, handle: int, outcome: tuple[str, bytes] | None = None) -> None:
        """A delivered event: its entry is acknowledged and deleted at the next flush, and its
        `outcome` (event_id, encoded row) kept in Redis."""
        loaded = self._outcome(handle)
        if loaded is None:
            return
        part = loaded.part
        batch = self._settles.get(id(part.lease))
        if batch is None:
            batch = self._settles[id(part.lease)] = _Settles(part.lease, part)
        batch.ids.append(loaded.entry_id)
        batch.outcomes.append(outcome)

    def dead_letter(
        self,
        handle: int,
        event: Event,
        note: DeadLetterNote,
        outcome: tuple[str, bytes] | None = None,
    ) -> None:
        """A failed event: its entry moves to the account's dead letters at the next flush."""
        loaded = self._outcome(handle)
        if loaded is None:
            return
        part = loaded.part
        fields = self.dead_fields(event, note)
        self._dead.append((part, part.lease, loaded.entry_id, fields, outcome))

    def dead_fields(self, event: Event, note: DeadLetterNote) -> dict[str, str]:
        """A dead letter as stream fields (`forwarder dlq` reads them back)."""
        record = note.record(event)
        return {
            "event": orjson.dumps(record["event"]).decode(),
            "reason": note.reason,
            "status": "" if note.status is None else str(note.status),
            "error": note.error,
            "attempts": str(note.attempts),
            "first_attempt_at": repr(note.first_attempt_at),
            "last_attempt_at": repr(note.last_attempt_at),
            "dead_lettered_at": repr(record["dead_lettered_at"]),
            "member": self.member,
        }

    @property
    def unflushed(self) -> int:
        """Outcomes not written to Redis yet."""
        return sum(len(b.ids) for b in self._settles.values()) + len(self._dead)

    # -- Redis work (the log's loops call these; Redis errors propagate) ----------------------

    async def flush(self) -> int:
        """Write the outcomes known so far; returns how many were written."""
        written = 0
        batches, self._settles = self._settles, {}
        try:
            while batches:
                key, batch = next(iter(batches.items()))
                acked = await self._streams.settle(batch.lease, batch.ids, batch.outcomes)
                del batches[key]
                self._flushed(batch.part, len(batch.ids), stale=acked < 0)
                written += len(batch.ids)
            while self._dead:
                part, lease, entry_id, fields, outcome = self._dead[0]
                done = await self._streams.dead_letter(lease, entry_id, fields, outcome)
                self._dead.pop(0)
                self._flushed(part, 1, stale=not done)
                if done:
                    self.counters.dead_lettered += 1
                written += 1
        finally:
            for key, batch in batches.items():  # not written: kept for the next flush
                mine = self._settles.setdefault(key, _Settles(batch.lease, batch.part))
                mine.ids[:0] = batch.ids
                mine.outcomes[:0] = batch.outcomes
        return written

    async def fill(self) -> int:
        """Load what the window has room for from the held partitions; returns how many."""
        loaded = 0
        new_by_account: dict[str, list[_Part]] = {}
        for part in list(self._parts.values()):
            if not part.loading or not self._valid(part.lease):
                continue
            room = self._queue.free
            if room <= 0:
                return loaded
            ahead = PARTITION_WINDOW - part.in_window
            if ahead <= 0:
                continue
            if part.phase != NEW:
                loaded += await self._catch_up(part, min(room, ahead, BATCH))
            if part.phase == NEW:
                new_by_account.setdefault(part.lease.account, []).append(part)
        for account, parts in new_by_account.items():
            room = self._queue.free
            if room <= 0:
                break
            ahead = min(PARTITION_WINDOW - part.in_window for part in parts)
            count = max(1, min(BATCH, room // len(parts), ahead))
            by_partition = {part.lease.partition: part for part in parts}
            entries = await self._streams.read_new(account, sorted(by_partition), count)
            for partition, part in by_partition.items():
                mine = [e for e in entries if e.partition == partition]
                loaded += self._load(part, mine)
        return loaded

    async def _catch_up(self, part: _Part, count: int) -> int:
        lease = part.lease
        if part.phase == PENDING:
            entries = await self._streams.read(
                lease.account, lease.partition, count, pending=True, after=part.after
            )
            if entries:
                part.after = entries[-1].entry_id
            if len(entries) < count:
                part.phase = CLAIMING
            if entries:
                return self._load(part, entries)
        now = self._clock()
        if now < max(part.next_claim_at, part.claim_all_at):
            return 0
        part.next_claim_at = now + CLAIM_RETRY_S
        # Everything the others left, whatever its idle time, so it comes in stream order: an
        # entry claimed and put back by a third holder is not overtaken by a later one.
        entries = await self._streams.claim_others(lease.account, lease.partition, count)
        self.counters.claimed += len(entries)
        if not entries and not await self._streams.pending_of_others(
            lease.account, lease.partition
        ):
            part.phase = NEW
        return self._load(part, entries)

    def _load(self, part: _Part, entries: list[Entry]) -> int:
        if not self.loading:
            return 0
        events: list[Event] = []
        handles: list[int] = []
        for entry in entries:
            if entry.event is None:
                # Deleted under us (no fields) or not an event: settled now, never delivered.
                self._unreadable(part, entry)
                continue
            handle = next(self._handles)
            self._loaded[handle] = _Loaded(part, entry.entry_id, id(entry.event))
            self._handle_of[id(entry.event)] = handle
            events.append(entry.event)
            handles.append(handle)
        if events:
            part.in_window += len(events)
            self._queue.restore(events, handles)
            self.counters.loaded += len(events)
        return len(events)

    def _unreadable(self, part: _Part, entry: Entry) -> None:
        part.unflushed += 1
        if not entry.raw:
            batch = self._settles.setdefault(id(part.lease), _Settles(part.lease, part))
            batch.ids.append(entry.entry_id)
            batch.outcomes.append(None)
            return
        fields = {
            "event": entry.raw.decode("utf-8", "replace"),
            "reason": "damaged",
            "status": "",
            "error": "the stream entry is not an event",
            "attempts": "0",
            "member": self.member,
        }
        self._dead.append((part, part.lease, entry.entry_id, fields, None))

    def _flushed(self, part: _Part, count: int, *, stale: bool) -> None:
        part.unflushed -= count
        if stale:
            self.counters.stale_settles += count
        else:
            self.counters.settled += count
        self._forget_if_idle((part.lease.account, part.lease.partition), part)

    def _forget_if_idle(self, key: tuple[str, int], part: _Part) -> None:
        idle = not part.loading and part.in_window == 0 and part.unflushed == 0
        if idle and self._parts.get(key) is part:
            del self._parts[key]
