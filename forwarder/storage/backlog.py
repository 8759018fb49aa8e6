"""The backlog: admission through the spool, and the in-memory queue as a window over it.

The durable backend (`durable.py`) admits through it: an event is committed to the spool before
intake answers 202; at most `queue.max_events` of them (and `queue.max_bytes` of their estimated
size) are in memory, and the rest are read from disk in order as the window drains, so a backlog
of millions costs bounded memory. The memory backend (`memory.py`) admits into the queue itself
and uses the backlog only once its spool is open: to replay what a stop saved, to save at a
stop, and to read rows `forwarder dlq replay` adds. Either way an event's spool row is removed
once it is delivered or dead-lettered, never before.

The window is shared fairly between accounts: with N accounts in it or waiting on disk, each
may hold at most 1/N of `max_events` (and of `max_bytes`). The refill reads the spool in order
once and passes over the rows of an account at its share, remembering where its first such row
is; the account is read again from there when it has room. An account below its share that
finds the window full takes the room back from accounts above theirs (their newest waiting
events leave memory; they are still in the spool). So a paused, broken or slow account holds
its share at most and never holds back another.

One module although past 400 lines: admission, the fair shares and the refill's scan keep one
set of positions (`_loaded_seq`, `_scanned_to`, `_passed`, `_in_memory`) true together; split,
each part would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import TOO_LARGE, EventQueue, event_size
from forwarder.storage.sqlite.committer import SpooledEvent
from forwarder.storage.sqlite.file import SpoolError
from forwarder.storage.sqlite.spool import Spool, SpoolFull

log = structlog.get_logger("forwarder.backlog")
# Rows read from disk per refill: big enough to amortise a query, small against memory.
REFILL_CHUNK = 1000
# The stop's save commits events about this many bytes (event_size) at a time.
SAVE_CHUNK_BYTES = 16 * 1024 * 1024
# How often to look for rows another process added (`forwarder dlq replay`).
REFRESH_S = 1.0
# Rows read at least when reading an account again from where it was passed over: most of them
# are usually passed over again (other accounts' rows, or its own past its share).
SCAN_MIN = 64
# Rows read at least past the furthest scan, where what does not fit is passed over.
PASS_CHUNK = 256
NO_BOUND = 1 << 62


class Backlog:
    """Admits events through the spool and refills the queue from it."""

    def __init__(
        self,
        queue: EventQueue,
        spool: Spool,
        *,
        status: StatusBook | None = None,
        numbers: EventNumbers | None = None,
    ) -> None:
        self.queue = queue
        # Given by the durable backend: outcomes stored with the settling, and numbers that are
        # spool positions (observed so the counter stays above them).
        self.status = status
        self.numbers = numbers
        self.spool = spool
        self.replayed = 0  # events brought back from the spool into memory
        # For the line a failing disk writes once per request (the daemon shares its own).
        self.throttle = LogThrottle()
        self.evicted = 0  # events given back to the spool to make room for another account
        # The scan's position: every row up to here is in memory, settled, or passed over for
        # an account in _passed.
        self._loaded_seq = 0
        self._scanned_to = 0  # the furthest the scan has been
        # False after rows were added below _scanned_to: the scan may not jump ahead.
        self._exact = True
        self._caught_up = not spool.depth  # nothing after _loaded_seq
        self._unloaded = spool.depth  # events in the spool and not in memory
        # Rows in memory now. Admissions resume in any order after a shared commit, so the
        # refill may meet rows that are in memory already; this set keeps them single.
        self._in_memory: set[int] = set()
        # Accounts whose rows the scan passed over: the first such row's seq and size.
        self._passed: dict[str, tuple[int, int]] = {}
        # Accounts read again from where they were passed over, until the scan is back.
        self._released: set[str] = set()
        self._starving = False  # the scan passed over an account below its share
        # Accounts whose events must stay out of the window for now (held without a lane).
        self.kept_out: Callable[[str], bool] = _never
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        queue.on_room = self._wake.set

    @property
    def on_disk_only(self) -> int:
        """Events in the spool that are not in memory yet."""
        return self._unloaded

    def wake(self) -> None:
        """Look again for rows to load (room was made other than by `done`)."""
        self._wake.set()

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
        """Commit all of `events` or none to the spool; returns "" or why not: "spool_full",
        "spool_error" or `TOO_LARGE` (the queue's bounds only limit the window).
        """
        sizes = list(map(event_size, events))  # before the spool's encoding (see EventQueue.admit)
        size = sum(sizes)
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
        # Committed: from here on the events are safe. Their numbers are their positions.
        for event, seq in zip(events, seqs, strict=True):
            event.number = seq
        if self.numbers is not None:
            self.numbers.observe(seqs[-1])
        # They join the window only if nothing older is still on disk (order) and they fit;
        # otherwise the refill brings them in.
        if self._caught_up and self._fits(events, size) and self.queue.offer(events, seqs, sizes):
            self._in_memory.update(seqs)
            self._loaded_seq = max(self._loaded_seq, seqs[-1])
            self._scanned_to = max(self._scanned_to, self._loaded_seq)
        else:
            self._unloaded += len(events)
            self._rewind(seqs[0] - 1)
            self._wake.set()
        return ""

    def delivered(self, event: Event, spool_seq: int) -> None:
        """An event was delivered: its row goes (in the next group commit)."""
        if spool_seq:
            self._in_memory.discard(spool_seq)
            outcome = self.status.take_unsaved(event) if self.status is not None else None
            self.spool.remove_soon([spool_seq], outcome)

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        """An event was dead-lettered: the record is written and its row removed, atomically."""
        self._in_memory.discard(spool_seq)
        outcome = self.status.take_unsaved(event) if self.status is not None else None
        self.spool.dead_letter_soon(spool_seq or None, event, note, outcome)

    async def replay_all(self) -> int:
        """Memory mode, at start: bring every saved event into memory, beyond the bound."""
        count = 0
        while rows := await self.spool.read_after(self._loaded_seq, REFILL_CHUNK):
            _number(rows)
            self.queue.restore([row.event for row in rows], [row.seq for row in rows])
            self._in_memory.update(row.seq for row in rows)
            self._loaded_seq = rows[-1].seq
            count += len(rows)
        self._unloaded = 0
        self._caught_up = True
        self.replayed += count
        return count

    async def save(self, leftovers: list[tuple[Event, int]]) -> int:
        """At a stop: spool the events that are in memory only; returns how many.

        In commits of about SAVE_CHUNK_BYTES: encoded all at once, the rows' bodies would take
        as much memory again as the queue, at the very end of a full queue's life (an OOM kill
        there loses it all). If a commit fails the ones before it stay saved: their event_ids
        make a second copy harmless.
        """
        unsaved = [event for event, spool_seq in leftovers if not spool_seq]
        chunk: list[Event] = []
        size = 0
        for event in unsaved:
            chunk.append(event)
            size += event_size(event)
            if size >= SAVE_CHUNK_BYTES:
                await self.spool.append(chunk, force=True)
                chunk, size = [], 0
        if chunk:
            await self.spool.append(chunk, force=True)
        return len(unsaved)

    # -- the window's shares ------------------------------------------------------------------

    def _shares(self, extra: set[str]) -> tuple[int, int]:
        """Each account's share of the window (events, bytes) with the accounts in memory, those
        passed over on disk and `extra` counted."""
        names = self.queue.accounts() | self._passed.keys() | extra
        n = max(1, len(names))
        max_bytes = self.queue.max_bytes
        return max(1, self.queue.max_events // n), (max_bytes // n if max_bytes > 0 else NO_BOUND)

    def _fits(self, events: list[Event], size: int) -> bool:
        """Whether a request's events may join the window at once (their account's share)."""
        account = events[0].account
        if account in self._passed or self.kept_out(account):
            return False
        held, held_bytes = self.queue.held(account)
        # A share with every account the queue knows counted is never more than the real one:
        # most admissions fit it, without building the set of accounts.
        least = max(1, len(self._passed) + self.queue.known_accounts + 1)
        max_events, max_bytes = self.queue.max_events, self.queue.max_bytes
        if held + len(events) <= max_events // least and (
            max_bytes <= 0 or held_bytes + size <= max_bytes // least
        ):
            return True
        share, share_bytes = self._shares({account})
        return held + len(events) <= share and held_bytes + size <= share_bytes

    def _room_for(self, account: str, size: int, share: tuple[int, int]) -> bool:
        """Whether `account` is below its share with one more event of `size`."""
        held, held_bytes = self.queue.held(account)
        return held < share[0] and (not held or held_bytes + size <= share[1])

    def _window_fits(self, size: int) -> bool:
        empty = not len(self.queue) and not self.queue.in_delivery
        return self.queue.free > 0 and (size <= self.queue.bytes_free or empty)

    def _release(self) -> int:
        """Read again the accounts passed over that have room now; make that room, if the window
        is full, from accounts above their share. Returns how many accounts it released."""
        released = 0
        if not self._passed:
            return released
        share = self._shares(set())
        for account, (seq, size) in list(self._passed.items()):
            if self.kept_out(account) or not self._room_for(account, size, share):
                continue
            if not self._window_fits(size):
                self._make_room(share)
                if not self._window_fits(size):
                    continue
            del self._passed[account]
            self._released.add(account)
            if seq - 1 < self._loaded_seq:
                self._loaded_seq = seq - 1
            self._caught_up = False
            released += 1
        return released

    def _make_room(self, share: tuple[int, int]) -> None:
        """Give back to the spool the newest waiting events of the accounts above their share."""
        for account in self.queue.accounts():
            held, held_bytes = self.queue.held(account)
            if held <= share[0] and held_bytes <= share[1]:
                continue
            taken = self.queue.evict(account, share[0], share[1])
            if not taken:
                continue
            seqs = [seq for _event, seq in taken]
            self._in_memory.difference_update(seqs)
            self._unloaded += len(taken)
            self.evicted += len(taken)
            first_event, first = taken[0]
            self._pass_over(account, first, event_size(first_event))

    def _pass_over(self, account: str, seq: int, size: int) -> None:
        passed = self._passed.get(account)
        if passed is None or seq < passed[0]:
            self._passed[account] = (seq, size)

    # -- the refill ---------------------------------------------------------------------------

    def _rewind(self, seq: int) -> None:
        """Rows above `seq` were added: read again from there."""
        self._caught_up = False
        if seq < self._loaded_seq:
            self._loaded_seq = seq
            self._exact = False  # rows below the furthest scan that were never seen

    def _sort(self, rows: list[SpooledEvent]) -> list[SpooledEvent]:
        """The rows to load now, in order; the others are passed over (their account noted).

        Rows already in memory are skipped. When the queue is empty the first row always fits
        the byte bound, so an event larger than it (admitted under an older config) cannot block.
        """
        fresh = [row for row in rows if row.seq not in self._in_memory]
        share = self._shares({row.event.account for row in fresh})
        free, budget = self.queue.free, self.queue.bytes_free
        empty = not len(self.queue) and not self.queue.in_delivery
        added: dict[str, tuple[int, int]] = {}
        load: list[SpooledEvent] = []
        for row in fresh:
            account = row.event.account
            size = event_size(row.event)
            if account not in self._passed and not self.kept_out(account):
                held, held_bytes = self.queue.held(account)
                more, more_bytes = added.get(account, (0, 0))
                held, held_bytes = held + more, held_bytes + more_bytes
                mine = held < share[0] and (not held or held_bytes + size <= share[1])
                if mine and free > 0 and (size <= budget or (empty and not load)):
                    load.append(row)
                    free -= 1
                    budget -= size
                    added[account] = (more + 1, more_bytes + size)
                    continue
                self._starving |= mine  # below its share, but the window is full
            self._pass_over(account, row.seq, size)
        return load

    def _all_served(self) -> bool:
        """Whether every account with a lane or events in memory is at its share: then passing
        over rows with a full window would find nobody to make room for (a single account's
        backlog is then read as the window drains, not passed over first)."""
        share, share_bytes = self._shares(set())
        for _name, held, held_bytes in self.queue.holdings():
            if not held or (held < share and held_bytes < share_bytes):
                return False
        return True

    def _read_limit(self) -> int:
        if self._loaded_seq < self._scanned_to:  # going over rows seen before: a few at a time
            return min(REFILL_CHUNK, max(self.queue.free, SCAN_MIN))
        # Rows that do not fit are passed over: a few more than the room, not a whole chunk.
        return min(REFILL_CHUNK, max(self.queue.free, PASS_CHUNK))

    async def _refill(self) -> None:
        last_refresh = time.monotonic()
        while True:
            # Cleared first: a delivery during the scan below must not go unnoticed.
            self._wake.clear()
            self._starving = False
            released = self._release()
            loaded = await self._scan()
            if loaded or (self._starving and not released):
                continue  # another look at once: room can be made for who was just found
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

    async def _scan(self) -> int:
        """Read the spool on from the scan's position to its end; returns how many were loaded.

        It goes on with a full window too: an account below its share may wait behind another's
        rows, and room is made for it once it is found.
        """
        loaded = 0
        while not self._caught_up:
            if (
                self._exact
                and self._loaded_seq < self._scanned_to
                and not (self._released - self._passed.keys())
            ):
                # Every account read again is passed over again: what lies up to the furthest
                # scan is theirs or other passed-over accounts', or in memory, or settled.
                self._loaded_seq = self._scanned_to
                self._released.clear()
            if not self.queue.free and self._loaded_seq >= self._scanned_to and self._all_served():
                break  # nobody could take a row found now: read on when room frees up
            rows = await self.spool.read_after(self._loaded_seq, self._read_limit())
            if not rows:
                self._caught_up = True
                self._released.clear()
                self._exact = True
                self._scanned_to = max(self._scanned_to, self._loaded_seq)
                if not self._passed:
                    self._unloaded = 0  # the count drifted (rows settled elsewhere): resync
                break
            new = self._sort(rows)
            _number(new)
            self.queue.restore([row.event for row in new], [row.seq for row in new])
            self._in_memory.update(row.seq for row in new)
            self._loaded_seq = rows[-1].seq
            if self._loaded_seq >= self._scanned_to:
                self._scanned_to = self._loaded_seq
                self._exact = True
                self._released.clear()
            self._unloaded = max(0, self._unloaded - len(new))
            self.replayed += len(new)
            loaded += len(new)
        return loaded


def _never(account: str) -> bool:
    return False


def _number(rows: list[SpooledEvent]) -> None:
    """Events read from the spool are numbered by their position (numbering.py)."""
    for row in rows:
        row.event.number = row.seq
