"""The bounded in-memory queue of accepted events.

The queue is the only buffer between intake and delivery, bounded both in events and in
(estimated) bytes. Admission is all-or-nothing per request,
so a batch is either wholly queued or wholly refused and the app always knows which events it
still holds.

No account can take the whole bound while others are there: half of it is shared, and the
other half is kept evenly for the accounts the queue knows (those with events or a lane waiting
on `get`), so an account whose delivery is paused leaves every other account at least
`max_events / (2 * accounts)` (and as much of `max_bytes`). One account alone may use it all.

Each account's delivery lane takes its own events. Events of one (account, recipient) are handed
out one at a time in acceptance order (unless ordering is off), so a recipient never sees a later
event overtake an earlier one that is still being retried.

One module although long: it is one data structure whose invariants span every method (the
tests' `check_structure` checks them after each step), split, they would be harder to keep true.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from forwarder.events import Event

# What one queued event costs in memory besides its text: the Event, the queue's entry and, in
# ordered mode, its recipient. It was about 1 KB an event with 100 000 recipients when each had a
# deque of its own; now nearer 600 B (tests/benchmarks/bench_queue_memory.py), but the figure
# stays: it is what queue.max_bytes has always meant, and it errs on the safe side.
EVENT_OVERHEAD_BYTES = 1024

# Why `admit` refused (the intake's 503 and 413 reasons).
QUEUE_FULL = "queue_full"
QUEUE_BYTES_FULL = "queue_bytes_full"
TOO_LARGE = "too_large"

# CPython stores a str at 1, 2 or 4 bytes a character, the widest its text needs: one emoji makes
# a 64 KiB text 256 KiB. And the first time C code asks a non-ASCII str for its UTF-8 form
# (orjson does: the spool's rows, the save at a stop) the str keeps that copy for its life, up to
# 2, 3 or 4 bytes a character more. A non-ASCII str's header, measured rather than assumed:
_WIDE_HEAD = sys.getsizeof("\u00e9") - 2
# The most UTF-8 bytes a character can take, by its bytes in memory (3: see _wide_extra).
_UTF8_MAX = (0, 2, 3, 4, 4)


def event_size(event: Event) -> int:
    """The bytes `queue.max_bytes` counts for an event: what its text can take in memory, plus a
    fixed overhead.

    ASCII text (the common case, checked in O(1)) counts a byte a character; other text what
    `_wide_extra` adds. The queue keeps the figure with the event: it must subtract what it
    added, and a str's size grows when its UTF-8 copy is cached.
    """
    e = event
    r, n, v, d, f = e.recipient_id, e.name, e.value, e.data, e.ref
    size = (
        len(e.account) + len(e.event_id) + len(r) + len(n) + len(v) + len(d) + len(f)
        + EVENT_OVERHEAD_BYTES
    )  # fmt: skip
    if r.isascii() and n.isascii() and v.isascii() and d.isascii() and f.isascii():
        return size  # event_id and account are ASCII by validation
    if not d.isascii():
        size += _wide_extra(d)
    if not v.isascii():
        size += _wide_extra(v)
    if not r.isascii():
        size += _wide_extra(r)
    if not n.isascii():
        size += _wide_extra(n)
    if not f.isascii():
        size += _wide_extra(f)
    return size


def _wide_extra(text: str, _sizeof: Callable[[object], int] = sys.getsizeof) -> int:
    """What a non-ASCII str can take in memory beyond a byte a character: its characters at
    their width, plus the UTF-8 copy CPython may cache with it (O(1), from `sys.getsizeof`)."""
    chars = len(text) + 1  # with the terminating NUL
    # Exact for a str without its UTF-8 copy. With one the quotient comes out larger (3 counts
    # 3 + 4): more, never less, than the str can take.
    width = min(4, max(1, (_sizeof(text) - _WIDE_HEAD) // chars))
    return _WIDE_HEAD + chars * (width + _UTF8_MAX[width]) - chars + 1


class _State(enum.Enum):
    WAITING = enum.auto()
    DELIVERING = enum.auto()
    GONE = enum.auto()  # handed back by take_all/take_account, or done


class _Entry:
    """One accepted event and its bookkeeping. Compared by identity, never by the event's value.

    It keeps its `event_size`, subtracted when it leaves: computed again then, it could come
    out larger than what was added (a str's size grows once its UTF-8 form is cached).
    """

    __slots__ = ("event", "next", "seq", "size", "spool_seq", "state", "ticket")

    def __init__(self, event: Event, seq: int, spool_seq: int = 0, size: int = 0) -> None:
        self.event = event
        self.seq = seq  # acceptance order across all accounts
        self.spool_seq = spool_seq  # its row in the spool; 0 when it is in memory only
        self.size = size  # its event_size when admitted
        self.state = _State.WAITING
        self.ticket = 0  # the order in which get() took it, for take_all
        # The recipient's next waiting entry (ordered mode; see _Recipient); None when last or
        # not waiting in a recipient's chain.
        self.next: _Entry | None = None


class _Recipient:
    """One recipient of one account: its waiting events (ordered mode) and how many are out.

    The waiting entries are a chain through `_Entry.next` from `first` to `last`, not a container:
    in a campaign burst most recipients have one waiting event, and a deque, even an empty one,
    allocates a 64-slot block (~760 bytes), which was most of what such an event cost. Appending,
    taking the oldest and putting one back at the head stay O(1).
    """

    __slots__ = ("busy", "first", "in_line", "last")

    def __init__(self) -> None:
        self.first: _Entry | None = None
        self.last: _Entry | None = None
        self.busy = 0  # events in delivery, counted in both modes so a mode switch is exact
        self.in_line = False

    def push(self, entry: _Entry) -> None:
        """Append `entry` (the newest) to the waiting ones."""
        if self.last is None:
            self.first = entry
        else:
            self.last.next = entry
        self.last = entry

    def pop(self) -> _Entry:
        """Remove and return the oldest waiting entry; IndexError if none is waiting."""
        entry = self.first
        if entry is None:
            raise IndexError("no waiting events")
        self.first = entry.next
        if self.first is None:
            self.last = None
        entry.next = None  # a taken entry must not keep the rest of the chain alive
        return entry

    def insert(self, entry: _Entry) -> None:
        """Put `entry` back among the waiting ones in acceptance (`seq`) order."""
        # A returned entry is older than most: the walk almost always stops at the head.
        before: _Entry | None = None
        after = self.first
        while after is not None and after.seq < entry.seq:
            before, after = after, after.next
        entry.next = after
        if before is None:
            self.first = entry
        else:
            before.next = entry
        if after is None:
            self.last = entry

    def drain(self) -> list[_Entry]:
        """Remove and return every waiting entry, oldest first."""
        entries: list[_Entry] = []
        entry = self.first
        while entry is not None:
            entries.append(entry)
            following = entry.next
            entry.next = None
            entry = following
        self.first = self.last = None
        return entries


class _Account:
    """One account's lane state: what its `get` callers take from and wait on."""

    __slots__ = ("busy", "bytes", "depth", "fifo", "line", "name", "recipients", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.recipients: dict[str, _Recipient] = {}
        # Ordered mode: recipients with waiting events and none in delivery, served round-robin.
        self.line: deque[_Recipient] = deque()
        # Unordered mode: the account's waiting events in acceptance order.
        self.fifo: deque[_Entry] = deque()
        self.waiters: deque[asyncio.Future[_Entry]] = deque()
        self.depth = 0
        self.busy = 0
        self.bytes = 0  # event_size of its waiting and in-delivery events (the backlog's shares)


class EventQueue:
    """Accepted events bounded by `max_events` and `max_bytes`, handed out per account and in order
    per recipient (`max_bytes` 0: no byte bound).

    Each account's delivery lane takes events with `get(account)` and reports each outcome with
    `done(event)`. While `ordered`, an event of an (account, recipient_id) is held back until the
    one before it is done, and ready recipients are served round-robin; otherwise each account is a
    plain FIFO. Events in delivery count against the bound: they are still only in memory.
    """

    def __init__(self, max_events: int, *, max_bytes: int = 0, ordered: bool = True) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._bytes = 0  # event_size of every waiting and in-delivery event
        self._ordered = ordered
        self._accounts: dict[str, _Account] = {}
        # Keyed by id(event): two events may be equal by value (an app resent an event_id). A list
        # because the very same object may even have been queued twice.
        self._delivering: dict[int, list[_Entry]] = {}
        self._waiting = 0
        self._in_delivery = 0
        self._seq = itertools.count()
        self._tickets = itertools.count()
        # Called when `done` makes room (the spool window refills from disk).
        self.on_room: Callable[[], None] | None = None

    @property
    def ordered(self) -> bool:
        """Whether events of one recipient are delivered one at a time, in acceptance order."""
        return self._ordered

    def set_ordered(self, ordered: bool) -> None:
        """Turn ordering on or off; waiting events keep their relative acceptance order."""
        if ordered == self._ordered:
            return
        self._ordered = ordered
        # Rare (a config reload), so rebuilding the other mode's structures wholesale is fine.
        for acct in list(self._accounts.values()):
            if ordered:
                for entry in acct.fifo:
                    self._recipient(acct, entry.event.recipient_id).push(entry)
                acct.fifo.clear()
                # Each ready recipient's oldest waiting seq: the line starts in acceptance order.
                ready = [
                    (rec.first.seq, rec)
                    for rec in acct.recipients.values()
                    if rec.first is not None and not rec.busy
                ]
                ready.sort(key=_by_first)
                for _, rec in ready:
                    rec.in_line = True
                    acct.line.append(rec)
            else:
                entries = self._unchain(acct)
                entries.sort(key=_by_seq)
                acct.fifo.extend(entries)
            # Turning ordering off frees the events of busy recipients for the waiting lanes.
            self._hand_out(acct)

    def __len__(self) -> int:
        return self._waiting

    @property
    def in_delivery(self) -> int:
        """Events taken by `get` whose outcome (`done`) is not known yet."""
        return self._in_delivery

    @property
    def free(self) -> int:
        """How many more events `offer` would take now (waiting and in-delivery ones count)."""
        return max(0, self.max_events - self._waiting - self._in_delivery)

    @property
    def bytes(self) -> int:
        """Estimated bytes of the waiting and in-delivery events (see `event_size`)."""
        return self._bytes

    @property
    def bytes_free(self) -> int:
        """How many more bytes (`event_size`) the byte bound lets in now."""
        if self.max_bytes <= 0:
            return 1 << 62
        return max(0, self.max_bytes - self._bytes)

    def offer(
        self,
        events: list[Event],
        spool_seqs: list[int] | None = None,
        sizes: list[int] | None = None,
    ) -> bool:
        """Queue all of `events`, or none of them if they do not all fit (see `admit`)."""
        return not self.admit(events, spool_seqs, sizes)

    def admit(
        self,
        events: list[Event],
        spool_seqs: list[int] | None = None,
        sizes: list[int] | None = None,
    ) -> str:
        """Queue all of `events` or none; returns "" or why not.

        The reasons: `QUEUE_FULL` (past `max_events`), `QUEUE_BYTES_FULL` (past `max_bytes`), and
        `TOO_LARGE` when the events alone exceed `max_bytes`, so waiting would never help.
        `spool_seqs` are the events' rows in the spool, reported back by `done`; `sizes` their
        `event_size`s if the caller has them already (taken before the spool's encoding cached
        their text's UTF-8 form, which would make them come out larger).
        """
        if len(events) == 1 and spool_seqs is None:
            return self._admit_one(events[0])
        if len(events) > self.free:
            return QUEUE_FULL
        if sizes is None:
            sizes = list(map(event_size, events))
        size = sum(sizes)
        if size > self.bytes_free:
            return TOO_LARGE if 0 < self.max_bytes < size else QUEUE_BYTES_FULL
        refused = self._over_reserve(events[0].account, len(events), size)
        if refused:
            return refused
        self._add(events, spool_seqs, sizes)
        return ""

    def _over_reserve(self, account: str, count: int, size: int) -> str:
        """Why `count` events (`size` bytes) of `account` would eat into the room kept for the
        other accounts, or "" (the caller checked the bounds themselves already)."""
        held = self._waiting + self._in_delivery
        # What is kept for others is under half of each bound: below half full, nothing to do.
        if held + count <= self.max_events // 2 and (
            self.max_bytes <= 0 or self._bytes + size <= self.max_bytes // 2
        ):
            return ""
        accounts = len(self._accounts) + (account not in self._accounts)
        if accounts <= 1:
            return ""
        keep = self.max_events // (2 * accounts)
        keep_bytes = self.max_bytes // (2 * accounts) if self.max_bytes > 0 else 0
        kept = kept_bytes = 0
        for name, acct in self._accounts.items():
            if name != account:
                kept += max(0, keep - acct.depth - acct.busy)
                kept_bytes += max(0, keep_bytes - acct.bytes)
        if held + count + kept > self.max_events:
            return QUEUE_FULL
        if self.max_bytes > 0 and self._bytes + size + kept_bytes > self.max_bytes:
            return QUEUE_BYTES_FULL
        return ""

    def _admit_one(self, event: Event) -> str:
        # `admit` of one event (memory mode's drop-in endpoint, one event a request), without
        # the batch's bookkeeping: that was about half of what queueing an event cost.
        if self._waiting + self._in_delivery >= self.max_events:
            return QUEUE_FULL
        size = event_size(event)
        if self.max_bytes > 0 and size > self.max_bytes - self._bytes:
            return TOO_LARGE if size > self.max_bytes else QUEUE_BYTES_FULL
        if len(self._accounts) > 1 or event.account not in self._accounts:
            refused = self._over_reserve(event.account, 1, size)
            if refused:
                return refused
        acct = self._accounts.get(event.account) or self._account(event.account)
        self._enqueue(acct, _Entry(event, next(self._seq), 0, size))
        self._bytes += size
        acct.bytes += size
        if acct.waiters:
            self._hand_out(acct)
        return ""

    def restore(self, events: Iterable[Event], spool_seqs: Iterable[int] | None = None) -> int:
        """Queue events in order regardless of the bounds (events saved at the last stop)."""
        return self._add(events, spool_seqs)

    async def get(self, account: str) -> Event:
        """Wait for the next deliverable event of `account`; report its outcome with `done`."""
        while True:
            acct = self._account(account)
            entry = self._take(acct)
            if entry is None:
                # Filled in by _hand_out, so each event goes to exactly one waiter, oldest first.
                waiter: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
                acct.waiters.append(waiter)
                try:
                    entry = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        # Handed an event, cancelled before running: the event must not be lost.
                        self._give_back(waiter.result())
                    else:
                        with contextlib.suppress(ValueError):
                            acct.waiters.remove(waiter)
                        self._prune(acct)
                    raise
                if entry.state is not _State.DELIVERING:
                    continue  # take_all took it back before this task woke up
            return entry.event

    def done(self, event: Event) -> int:
        """The event has its outcome (delivered or dead-lettered): its recipient may go on.

        Returns the event's spool row (0 if it has none), for the caller to remove.
        """
        entries = self._delivering.get(id(event))
        if not entries:
            raise ValueError(
                f"event {event.event_id!r} is not in delivery (done twice, or not taken by get)"
            )
        entry = entries[0]
        acct, rec = self._settle(entry)
        entry.state = _State.GONE
        self._bytes -= entry.size
        acct.bytes -= entry.size
        if not rec.busy:
            if rec.first is not None:  # ordered mode only
                if not rec.in_line:
                    # The back of the line: a chatty recipient must not starve the others.
                    rec.in_line = True
                    acct.line.append(rec)
                self._hand_out(acct)
            else:
                del acct.recipients[event.recipient_id]
        self._prune(acct)
        if self.on_room is not None:
            self.on_room()
        return entry.spool_seq

    def depth(self, account: str) -> int:
        """Waiting events of `account` (not counting those in delivery)."""
        acct = self._accounts.get(account)
        return acct.depth if acct is not None else 0

    def held(self, account: str) -> tuple[int, int]:
        """Events of `account` in memory (waiting and in delivery) and their `event_size` bytes."""
        acct = self._accounts.get(account)
        return (acct.depth + acct.busy, acct.bytes) if acct is not None else (0, 0)

    @property
    def known_accounts(self) -> int:
        """Accounts the queue keeps state for (with events, or a lane waiting): at least as
        many as `accounts()` holds, found without building that set."""
        return len(self._accounts)

    def holdings(self) -> list[tuple[str, int, int]]:
        """(account, events held, their bytes) of every account the queue keeps state for,
        idle lanes waiting on `get` included (with 0 and 0)."""
        return [(a.name, a.depth + a.busy, a.bytes) for a in self._accounts.values()]

    def accounts(self) -> set[str]:
        """Accounts with waiting or in-delivery events."""
        return {name for name, acct in self._accounts.items() if acct.depth or acct.busy}

    def find(self, key: str | int) -> Event | None:
        """The event waiting or in delivery with this event_id (str) or number (int), or None.

        A scan of the queue, for a status look-up (eventstatus.py): an index would cost every
        accepted event a dict entry, and look-ups are rare.
        """
        by_number = isinstance(key, int)
        for entry in self._entries():
            event = entry.event
            if (event.number == key) if by_number else (event.event_id == key):
                return event
        return None

    def _entries(self) -> Iterator[_Entry]:
        for entries in self._delivering.values():
            yield from entries
        for acct in self._accounts.values():
            yield from acct.fifo
            for rec in acct.recipients.values():
                entry = rec.first
                while entry is not None:
                    yield entry
                    entry = entry.next

    def oldest_accepted_at(self) -> float | None:
        """When the oldest event in the queue (waiting or in delivery) was accepted; None if empty.

        A walk over every recipient's head: O(recipients), so it is for a scrape or a status
        read, never for the hot path. A recipient's first waiting event is its oldest one.
        """
        heads = [entry.event.accepted_at for ents in self._delivering.values() for entry in ents]
        for acct in self._accounts.values():
            if acct.fifo:
                heads.append(acct.fifo[0].event.accepted_at)
            heads.extend(
                rec.first.event.accepted_at
                for rec in acct.recipients.values()
                if rec.first is not None
            )
        return min(heads, default=None)

    def take_all(self) -> list[Event]:
        """Remove and return every event, for saving at a stop; the queue is empty afterwards.

        See `take_all_spooled`, which also says which of them are in the spool already.
        """
        return [event for event, _ in self.take_all_spooled()]

    def take_all_spooled(self) -> list[tuple[Event, int]]:
        """Remove and return every event with its spool row (0: in memory only).

        Events in delivery come first, in the order `get` took them, then the waiting ones in
        acceptance order across all accounts. A `get` handed an event it has not returned yet
        waits on instead, and `done` of a taken-back event raises ValueError.
        """
        delivering = sorted(
            (entry for entries in self._delivering.values() for entry in entries),
            key=lambda entry: entry.ticket,
        )
        waiting: list[_Entry] = []
        for acct in list(self._accounts.values()):
            waiting.extend(acct.fifo)
            for rec in acct.recipients.values():
                waiting.extend(rec.drain())
            acct.recipients.clear()
            acct.line.clear()
            acct.fifo.clear()
            acct.depth = acct.busy = acct.bytes = 0
            self._prune(acct)  # kept only while a lane is waiting on it
        waiting.sort(key=_by_seq)
        self._delivering.clear()
        self._waiting = self._in_delivery = self._bytes = 0
        taken = delivering + waiting
        for entry in taken:
            entry.state = _State.GONE
        return [(entry.event, entry.spool_seq) for entry in taken]

    def take_account(self, account: str) -> list[Event]:
        """Remove and return the waiting events of `account` in acceptance order (a re-route).

        Its events in delivery stay in delivery and are still reported with `done`.
        """
        return [event for event, _ in self.take_account_spooled(account)]

    def take_account_spooled(self, account: str) -> list[tuple[Event, int]]:
        """`take_account`, with each event's spool row (0: in memory only)."""
        return self.evict(account, 0)

    def evict(self, account: str, keep: int, keep_bytes: int = -1) -> list[tuple[Event, int]]:
        """Remove the newest waiting events of `account` until at most `keep` events (and, if
        `keep_bytes` >= 0, at most that many bytes) of it are held; returns them, oldest first,
        with their spool rows.

        The backlog's window gives an account's share back this way: the events are in the
        spool, and its older events stay, so its order is kept when they are read again.
        Events in delivery are never taken.
        """
        acct = self._accounts.get(account)
        if acct is None:
            return []
        entries = list(acct.fifo)
        acct.fifo.clear()
        entries.extend(self._unchain(acct))
        entries.sort(key=_by_seq)
        held, held_bytes = acct.depth + acct.busy, acct.bytes
        cut = len(entries)
        while cut and (held > keep or held_bytes > keep_bytes >= 0):
            cut -= 1
            held -= 1
            held_bytes -= entries[cut].size
        kept, taken = entries[:cut], entries[cut:]
        for entry in taken:
            entry.state = _State.GONE
            self._bytes -= entry.size
            acct.bytes -= entry.size
        # Every entry left the account's waiting ones above; the kept go back, in acceptance
        # order, as new ones do.
        self._waiting -= len(entries)
        acct.depth -= len(entries)
        for entry in kept:
            self._enqueue(acct, entry)
        self._prune(acct)
        return [(entry.event, entry.spool_seq) for entry in taken]

    def _add(
        self,
        events: Iterable[Event],
        spool_seqs: Iterable[int] | None,
        sizes: Iterable[int] | None = None,
    ) -> int:
        """Queue `events` in order; `sizes` are their `event_size`s if the caller has them."""
        touched: dict[str, _Account] = {}
        count = 0
        if not isinstance(events, list):
            events = list(events)
        seqs: Iterable[int] = itertools.repeat(0)
        if spool_seqs is not None:
            seqs = list(spool_seqs)
            if len(seqs) != len(events):
                raise ValueError("events and spool_seqs differ in length")
        if sizes is None:
            sizes = map(event_size, events)
        added = 0
        for event, spool_seq, size in zip(events, seqs, sizes, strict=False):
            acct = self._account(event.account)
            touched[event.account] = acct
            added += size
            acct.bytes += size
            # _enqueue's work inline: a call per event is measurable in a batch's cost.
            entry = _Entry(event, next(self._seq), spool_seq, size)
            acct.depth += 1
            self._waiting += 1
            if self._ordered:
                rec = self._recipient(acct, event.recipient_id)
                rec.push(entry)
                if not rec.busy and not rec.in_line:
                    rec.in_line = True
                    acct.line.append(rec)
            else:
                acct.fifo.append(entry)
            count += 1
        self._bytes += added
        for acct in touched.values():
            self._hand_out(acct)
        return count

    def _enqueue(self, acct: _Account, entry: _Entry) -> None:
        """Add an entry (the newest) to the account's waiting ones (`_add` inlines this; `evict`
        puts back what it keeps)."""
        acct.depth += 1
        self._waiting += 1
        if self._ordered:
            rec = self._recipient(acct, entry.event.recipient_id)
            rec.push(entry)
            if not rec.busy and not rec.in_line:
                rec.in_line = True
                acct.line.append(rec)
        else:
            acct.fifo.append(entry)

    def _take(self, acct: _Account) -> _Entry | None:
        """The next deliverable entry of the account, now in delivery; None if there is none."""
        if self._ordered:
            if not acct.line:
                return None
            rec = acct.line.popleft()
            rec.in_line = False
            entry = rec.pop()
        else:
            if not acct.fifo:
                return None
            entry = acct.fifo.popleft()
            rec = self._recipient(acct, entry.event.recipient_id)
        rec.busy += 1
        acct.busy += 1
        acct.depth -= 1
        self._waiting -= 1
        self._in_delivery += 1
        entry.state = _State.DELIVERING
        entry.ticket = next(self._tickets)
        self._delivering.setdefault(id(entry.event), []).append(entry)
        return entry

    def _hand_out(self, acct: _Account) -> None:
        """Give deliverable entries to the account's waiting `get` callers, oldest caller first."""
        waiters = acct.waiters
        while waiters:
            if waiters[0].done():  # cancelled, its get has not cleaned up yet
                waiters.popleft()
                continue
            entry = self._take(acct)
            if entry is None:
                return
            waiters.popleft().set_result(entry)

    def _give_back(self, entry: _Entry) -> None:
        """Undo a `get` that was cancelled after being handed `entry`: back at the head."""
        if entry.state is not _State.DELIVERING:
            return  # take_all has it already
        acct, rec = self._settle(entry)
        entry.state = _State.WAITING
        acct.depth += 1
        self._waiting += 1
        if self._ordered:
            rec.insert(entry)
            if not rec.busy and not rec.in_line:
                rec.in_line = True
                acct.line.appendleft(rec)  # it was this recipient's turn
        else:
            _insert_by_seq(acct.fifo, entry)
            if not rec.busy:
                del acct.recipients[entry.event.recipient_id]
        self._hand_out(acct)

    def _settle(self, entry: _Entry) -> tuple[_Account, _Recipient]:
        """Take `entry` out of delivery; returns its account and recipient (both still there)."""
        event = entry.event
        entries = self._delivering[id(event)]
        entries.remove(entry)  # _Entry has no __eq__: this is by identity
        if not entries:
            del self._delivering[id(event)]
        self._in_delivery -= 1
        acct = self._accounts[event.account]
        rec = acct.recipients[event.recipient_id]
        acct.busy -= 1
        rec.busy -= 1
        return acct, rec

    def _account(self, name: str) -> _Account:
        acct = self._accounts.get(name)
        if acct is None:
            acct = self._accounts[name] = _Account(name)
        return acct

    @staticmethod
    def _recipient(acct: _Account, recipient_id: str) -> _Recipient:
        rec = acct.recipients.get(recipient_id)
        if rec is None:
            rec = acct.recipients[recipient_id] = _Recipient()
        return rec

    @staticmethod
    def _unchain(acct: _Account) -> list[_Entry]:
        """Remove every recipient's waiting entries (not sorted); recipients with none in
        delivery go too, and the line is emptied."""
        entries: list[_Entry] = []
        acct.line.clear()
        for recipient_id, rec in list(acct.recipients.items()):
            entries.extend(rec.drain())
            rec.in_line = False
            if not rec.busy:
                del acct.recipients[recipient_id]
        return entries

    def _prune(self, acct: _Account) -> None:
        # Client-key accounts come and go; an idle one should not stay in memory for ever.
        idle = not acct.depth and not acct.busy and not acct.waiters
        if idle and self._accounts.get(acct.name) is acct:
            del self._accounts[acct.name]


def _by_seq(entry: _Entry) -> int:
    return entry.seq


def _by_first(ready: tuple[int, _Recipient]) -> int:
    return ready[0]


def _insert_by_seq(entries: deque[_Entry], entry: _Entry) -> None:
    # A returned entry is older than most: the scan almost always stops at the head.
    for index, other in enumerate(entries):
        if other.seq > entry.seq:
            entries.insert(index, entry)
            return
    entries.append(entry)
