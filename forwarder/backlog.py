"""The backlog: admission through the spool, and the in-memory queue as a window over it.

In `durable` mode an event is committed to the spool before intake answers 202; at most
`queue.max_events` of them (and `queue.max_bytes` of their estimated size) are in memory, and the
rest are read from disk in order as the window drains, so a backlog of millions costs bounded
memory. In `memory` mode events go straight to the queue; the spool then only holds what a stop
saved, replayed at the next start. In both modes an event's spool row is removed once it is
delivered or dead-lettered, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from forwarder.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.logthrottle import LogThrottle
from forwarder.queue import TOO_LARGE, EventQueue, event_size
from forwarder.spool import Spool, SpooledEvent, SpoolFull
from forwarder.spoolfile import SpoolError

log = structlog.get_logger("forwarder.backlog")
# Rows read from disk per refill: big enough to amortise a query, small against memory.
REFILL_CHUNK = 1000
# How often to look for rows another process added (`forwarder dlq replay`).
REFRESH_S = 1.0


class Backlog:
    """Admits events (through the spool when durable) and refills the queue from the spool."""

    def __init__(self, queue: EventQueue, spool: Spool, *, durable: bool) -> None:
        self.queue = queue
        self.spool = spool
        self.durable = durable
        self.replayed = 0  # events brought back from the spool into memory
        # For the line a failing disk writes once per request (the daemon shares its own).
        self.throttle = LogThrottle()
        self._loaded_seq = 0  # every spool row up to here is in memory (or settled)
        self._unloaded = spool.depth  # rows after _loaded_seq: on disk only
        # Rows in memory now. Admissions resume in any order after a shared commit, so the
        # refill may meet rows that are in memory already; this set keeps them single.
        self._in_memory: set[int] = set()
        # The size of the next row on disk when it did not fit the byte bound: the refill waits
        # until that much is free instead of reading the same rows again after every delivery.
        self._blocked_size = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        queue.on_room = self._wake.set

    @property
    def on_disk_only(self) -> int:
        """Events in the spool that are not in memory yet."""
        return self._unloaded

    def start(self) -> None:
        """Start refilling the queue from the spool."""
        self._wake.set()
        self._task = asyncio.create_task(self._refill(), name="spool-refill")

    async def stop(self) -> None:
        """Stop refilling (events not loaded stay in the spool)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def admit(self, events: list[Event]) -> str:
        """Take all of `events` or none; returns "" or why not.

        The reasons: those of `EventQueue.admit` in memory mode; "spool_full", "spool_error" and
        `TOO_LARGE` in durable mode, where the queue's bounds only limit the window.
        """
        if not self.durable:
            return self.queue.admit(events)
        size = sum(map(event_size, events))
        if 0 < self.queue.max_bytes < size:
            return TOO_LARGE  # it could never be in memory at once: refused in both modes alike
        try:
            seqs = await self.spool.append(events)
        except SpoolFull:
            return "spool_full"
        except SpoolError as exc:  # the commit failed (disk full, I/O error): nothing stored
            self.throttle.log(
                log, "error", "spool_write_failed", key="request", error=str(exc), count=len(events)
            )
            return "spool_error"
        # Committed: from here on the events are safe. They join the window only if nothing
        # older is still on disk (order) and they fit; otherwise the refill brings them in.
        if not self._unloaded and self.queue.offer(events, seqs, size):
            self._in_memory.update(seqs)
            self._loaded_seq = max(self._loaded_seq, seqs[-1])
        else:
            self._unloaded += len(events)
            self._rewind(seqs[0] - 1)
            self._wake.set()
        return ""

    def delivered(self, event: Event, spool_seq: int) -> None:
        """An event was delivered: its row goes (in the next group commit)."""
        if spool_seq:
            self._in_memory.discard(spool_seq)
            self.spool.remove_soon([spool_seq])

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        """An event was dead-lettered: the record is written and its row removed, atomically."""
        self._in_memory.discard(spool_seq)
        self.spool.dead_letter_soon(spool_seq or None, event, note)

    async def replay_all(self) -> int:
        """Memory mode, at start: bring every saved event into memory, beyond the bound."""
        count = 0
        while rows := await self.spool.read_after(self._loaded_seq, REFILL_CHUNK):
            self.queue.restore([row.event for row in rows], [row.seq for row in rows])
            self._in_memory.update(row.seq for row in rows)
            self._loaded_seq = rows[-1].seq
            count += len(rows)
        self._unloaded = 0
        self.replayed += count
        return count

    async def save(self, leftovers: list[tuple[Event, int]]) -> int:
        """At a stop: spool the events that are in memory only; returns how many."""
        unsaved = [event for event, spool_seq in leftovers if not spool_seq]
        if unsaved:
            await self.spool.append(unsaved, force=True)
        return len(unsaved)

    def _rewind(self, seq: int) -> None:
        """Rows at or below `seq` may be on disk only: read again from there."""
        if seq < self._loaded_seq:
            self._loaded_seq = seq
            self._blocked_size = 0  # other rows come first now

    def _fitting(self, rows: list[SpooledEvent]) -> tuple[list[SpooledEvent], int]:
        """The rows, in order, that fit the queue's byte bound, and the last seq they cover.

        Rows already in memory are passed over. When the queue is empty the first row always
        fits, so an event larger than the bound (admitted under an older config) cannot block.
        """
        budget = self.queue.bytes_free
        empty = not len(self.queue) and not self.queue.in_delivery
        fit: list[SpooledEvent] = []
        last = self._loaded_seq
        for row in rows:
            if row.seq not in self._in_memory:
                size = event_size(row.event)
                if size > budget and (fit or not empty):
                    self._blocked_size = size
                    break
                budget -= size
                fit.append(row)
            last = row.seq
        return fit, last

    async def _refill(self) -> None:
        last_refresh = time.monotonic()
        while True:
            empty = not len(self.queue) and not self.queue.in_delivery
            room = self.queue.free > 0 and (self.queue.bytes_free >= self._blocked_size or empty)
            if self._unloaded > 0 and room:
                self._blocked_size = 0
                rows = await self.spool.read_after(
                    self._loaded_seq, min(self.queue.free, REFILL_CHUNK)
                )
                if not rows:
                    self._unloaded = 0  # the count drifted (rows settled elsewhere): resync
                    continue
                new, last = self._fitting(rows)
                self.queue.restore([row.event for row in new], [row.seq for row in new])
                self._in_memory.update(row.seq for row in new)
                progressed = last != self._loaded_seq
                self._loaded_seq = last
                self._unloaded = max(0, self._unloaded - len(new))
                self.replayed += len(new)
                if progressed and not self._blocked_size:
                    continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
            # arrives as the event is set, and this event is set on every delivery.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH_S):
                    await self._wake.wait()
            if time.monotonic() - last_refresh >= REFRESH_S:
                last_refresh = time.monotonic()
                added = await self.spool.refresh()
                if added:
                    log.info("spool_rows_added", count=added, source="another process")
                    self._unloaded += added
                    # They may sit below rows this process appended since: read from there.
                    self._rewind(self.spool.added_after)
