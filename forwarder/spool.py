"""The spool: accepted events and dead letters in one SQLite database that survives kill -9.

`state.dir/spool.db` runs in WAL mode with `synchronous=FULL`, so a committed transaction is on
disk when COMMIT returns. `Spool` is the daemon's handle: every database call runs on one
dedicated thread (the event loop never waits on SQLite), and appends, removals and dead letters
that arrive close together share one transaction and one fsync (group commit).

The module-level helpers are for the `forwarder dlq` CLI, which runs in its own process and may
work on the database while the daemon has it open (WAL lets readers and one writer coexist).

A file that is not ours (another application_id), is from a newer forwarder, or is damaged is
never deleted: the daemon moves it aside to `spool.db.damaged-<UTC time>` and starts a fresh one.
A spool of an older schema version is upgraded in place by the daemon when it opens it.

Each append is stored as one row of the `batches` table: its events encoded together (orjson, an
array of arrays) in one BLOB. An event's position is `seq = row << ROW_BITS | index`, so events
keep their order and a seq is never reused. A row is deleted once every event in it is settled
(delivered or dead-lettered); until then the settled ones are listed in the `settled` table.
One row per request, not one per event: a batch of 100 costs SQLite one row insert instead of
100 (each about 3 µs of CPU, on the core the event loop shares), which is what made durable mode
cost half of batch intake's throughput. Settling, the rare side (the remote's rate limit paces
it), pays a little more instead. Dead letters keep the event as a JSON body, one row each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
import structlog

from forwarder.deadletter import DeadLetterNote
from forwarder.events import Event, shared_name

SPOOL_FILE = "spool.db"
PAGE_SIZE = 16384  # for new spool files (see _connect_daemon)
APPLICATION_ID = 0x46574452  # "FWDR": PRAGMA application_id, to recognise our own files
# PRAGMA user_version. 1: an event per row as a JSON body; 2: an event per row in typed columns;
# 3: an append per row (upgraded at open).
SCHEMA_VERSION = 3
# An event's seq is `row << ROW_BITS | index`: a row holds at most ROW_EVENTS events.
ROW_BITS = 10
ROW_EVENTS = 1 << ROW_BITS
_INDEX_MASK = ROW_EVENTS - 1
# How long a connection waits for another one's write lock (the CLI's, or the daemon's).
BUSY_TIMEOUT_S = 5.0
# Rows per transaction for the CLI's bulk operations: short locks, so the daemon barely waits.
CHUNK_ROWS = 1000

log = structlog.get_logger("forwarder.spool")

_MAGIC = b"SQLite format 3\x00"
_SIDE_FILES = ("-wal", "-shm")
# Result codes (primary) that mean the bytes are bad, as opposed to locked, missing or I/O.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# Values per `IN (...)` list: below the 999 bound-parameter limit of older SQLite builds.
_IN_CHUNK = 500

_CREATE_BATCHES = """CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
)"""
_SCHEMA = (
    _CREATE_BATCHES,
    # Events settled out of rows that still hold unsettled ones (their seqs, not row seqs).
    "CREATE TABLE IF NOT EXISTS settled (seq INTEGER PRIMARY KEY)",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT,
        account TEXT,
        reason TEXT,
        status INTEGER,
        error TEXT,
        attempts INTEGER,
        first_attempt_at REAL,
        last_attempt_at REAL,
        dead_lettered_at REAL,
        body TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS dead_letters_at ON dead_letters (dead_lettered_at)",
)
_ROW_MARKS = "(?, ?, ?, ?)"
# Rows per INSERT, at most: one multi-row statement for a group of appends instead of one per
# row (each statement's step gives up and takes back the GIL). 64 rows bind 256 values.
_ROWS_PER_INSERT = 64
# A statement for each row count up to that (sqlite3 caches the prepared ones it is given).
_INSERT_BATCHES = {
    rows: "INSERT INTO batches (count, accepted_at, size, body) VALUES "
    + ", ".join([_ROW_MARKS] * rows)
    for rows in range(1, _ROWS_PER_INSERT + 1)
}
# The upgrades keep every event's position: an old seq becomes the seq of a one-event row.
_INSERT_BATCH_AT = (
    "INSERT INTO batches (seq, count, accepted_at, size, body) VALUES (?, ?, ?, ?, ?)"
)
_SELECT_BATCHES = "SELECT seq, count, accepted_at, body FROM batches"
# Rows fetched at a time by a read of the window (each holds up to ROW_EVENTS events).
_READ_ROWS = 16
_INSERT_DEAD = (
    "INSERT INTO dead_letters (event_id, account, reason, status, error, attempts,"
    " first_attempt_at, last_attempt_at, dead_lettered_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DEAD_COLUMNS = (
    "id, event_id, account, reason, status, error, attempts, first_attempt_at,"
    " last_attempt_at, dead_lettered_at, body"
)

_T = TypeVar("_T")
# count, accepted_at (of its first event), size (of the body), body
_BatchRow = tuple[int, float, int, bytes]
_SIZE: Final = 2  # the index of size in a _BatchRow
_DeadRow = tuple[str | None, str, str, int | None, str, int, float, float, float, str]


class SpoolError(Exception):
    """The spool cannot be used (the message says why and where)."""


class SpoolFull(Exception):
    """Appending these events would take the spool past its `max_bytes`; nothing was stored."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """An event as stored in the spool, with its position (`seq`, never reused)."""

    seq: int
    event: Event


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One row of the dead-letter table.

    A row whose stored body is not a valid event (reason "damaged") carries a stand-in event with
    empty recipient_id and name and the raw body in `data`, so it can still be listed and read.
    For a spool row that was not a valid event, that body is `{"damaged_spool_row": {column:
    value}}`: the row as it was, in a form that never reads as an event (so it is not replayed).
    """

    id: int
    event: Event
    reason: str
    status: int | None
    error: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    dead_lettered_at: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: the keys of `dead_letter_record` plus "id"."""
        return {
            "id": self.id,
            "event": self.event.to_dict(),
            "reason": self.reason,
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
            "dead_lettered_at": self.dead_lettered_at,
        }


@dataclass(slots=True)
class _Totals:
    """The spool's counters as of the last commit; the thread's copy is the authoritative one."""

    depth: int = 0
    bytes: int = 0
    max_row: int = 0  # every row with a seq up to here is counted in depth/bytes
    min_row: int | None = None
    oldest_accepted_at: float | None = None
    dead_letters: int = 0
    damaged: int = 0


@dataclass(slots=True, eq=False)
class _Op:
    """One caller's request waiting for the next group commit."""

    future: asyncio.Future[Any] | None
    rows: list[_BatchRow] = field(default_factory=list)
    removes: list[int] = field(default_factory=list)
    dead: _DeadRow | None = None
    reserved: int = 0  # bytes counted against max_bytes until the commit settles
    is_append: bool = False


class Spool:
    """Accepted events and dead letters in SQLite; every database call runs on one dedicated thread.

    Create it with `await Spool.open(state_dir)`. The public counters are plain attributes that
    change only on the event loop, right after the commit that made them true.
    """

    moved_aside: Path | None
    moved_aside_reason: str | None
    depth: int
    bytes: int
    max_seq: int  # every event seq up to here has been given out
    oldest_accepted_at: float | None
    dead_letters: int
    damaged: int
    added_after: int

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        group_window_s: float,
        on_commit: Callable[[float], None] | None,
    ) -> None:
        """Use `Spool.open`; this only sets up the (not yet open) handle."""
        self.path = path
        self.max_bytes = max_bytes
        self.moved_aside = None  # the caller logs it; `moved_aside_reason` says what was wrong
        self.moved_aside_reason = None
        self.depth = 0
        self.bytes = 0  # the stored rows' sizes: bytes of their encoded events (see _encode)
        self.max_seq = 0
        self.oldest_accepted_at = None
        self.dead_letters = 0
        self.damaged = 0  # rows that were no valid event moved to dead_letters since open
        # After refresh() found rows added by another process: all of them have seq > this.
        # Rows of `forwarder dlq replay` may land below seqs this process got since (both write).
        self.added_after = 0
        self._window = max(0.0, group_window_s)
        self._on_commit = on_commit
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._reserved = 0  # bytes of appends queued or committing
        self._accepting = False
        # Requests waiting for a group commit, shared with the spool thread (under _lock). The
        # group is gathered on the thread, not on the loop: a loop busy answering a burst runs
        # no timer and no other task until it has gone through every ready request, so a group
        # cut there took them all and the loop then sat idle through the commit. From the
        # thread, the first request's group is cut after the window while the loop still
        # works, and the rest form the next group while this one is written (a pipeline).
        self._lock = threading.Lock()
        self._pending: list[_Op] = []
        self._first_at = 0.0  # time.monotonic() of the oldest pending request
        self._scheduled = False  # a group job is submitted that has not taken _pending yet
        self._cut = threading.Event()  # set by close: no more waiting out windows
        self._group_jobs: set[Future[None]] = set()
        self._close_task: asyncio.Task[None] | None = None
        # Thread-only state: touched by code running on the spool thread and nowhere else.
        self._conn: sqlite3.Connection | None = None
        self._t = _Totals()
        self._foreign = 0  # rows other processes added, not yet reported by refresh()
        self._foreign_after = 0
        self._last_commit_at = 0.0  # time.monotonic() when the last group commit ended

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        max_bytes: int = 0,
        # 3 ms: on a loaded core 2 ms caught about one 100-event request a group, and each
        # commit's fsync and GIL hand-overs cost the loop more than the wait; 5 ms made 32
        # closed-loop single-event clients wait for it, with the loop idle (bench_spool.py).
        group_window_s: float = 0.003,
        on_commit: Callable[[float], None] | None = None,
    ) -> Spool:
        """Open (or create) `state_dir/spool.db`; a damaged or foreign file is moved aside first.

        `max_bytes` bounds the stored bodies (0: no bound). `on_commit(seconds)` is called on the
        event loop with each commit's duration (the write and fsync of the WAL).
        """
        spool = cls(
            state_dir / SPOOL_FILE,
            max_bytes=max_bytes,
            group_window_s=group_window_s,
            on_commit=on_commit,
        )
        try:
            moved, reason, totals = await spool._loop.run_in_executor(
                spool._executor, spool._open_job, state_dir
            )
        except BaseException:
            spool._executor.shutdown(wait=False)
            raise
        spool.moved_aside = moved
        spool.moved_aside_reason = reason
        spool._publish(totals)
        spool.added_after = _last_seq(totals.max_row)
        spool._accepting = True
        return spool

    async def close(self) -> None:
        """Commit what is queued, close the database and stop the thread (safe to call twice)."""
        if self._close_task is None:
            self._close_task = asyncio.create_task(self._close(), name="spool-close")
        # Shielded: a caller giving up must not cut the final flush short.
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._accepting = False  # nothing new; what is queued is committed first (below)
        self._cut.set()  # a group waiting out its window is committed at once
        try:
            # The one worker runs jobs in order: every submitted group job before this one.
            await self._loop.run_in_executor(self._executor, self._close_job)
        finally:
            self._executor.shutdown(wait=False)

    # -- the public operations ----------------------------------------------------------------

    async def append(self, events: list[Event], *, force: bool = False) -> list[int]:
        """Store all of `events` durably; returns their new seqs (increasing, in order).

        Raises SpoolFull (and stores nothing) if `max_bytes` is set and the spool would pass it;
        `force` skips that bound (for saving in-memory events at a stop). Returns only once the
        transaction holding them is committed and fsynced. Raises ValueError (and stores none of
        them) if an event holds text that is not valid Unicode (a lone surrogate); appends that
        shared its transaction are stored all the same.
        """
        if not events:
            return []
        rows = _encode(events)
        size = sum(row[_SIZE] for row in rows)
        if not force and self.max_bytes > 0 and self.bytes + self._reserved + size > self.max_bytes:
            raise SpoolFull(
                f"{len(events)} events ({size} bytes) do not fit: the spool holds {self.bytes}"
                f" of {self.max_bytes} bytes ({self._reserved} more are being committed)"
            )
        future: asyncio.Future[list[int]] = self._loop.create_future()
        op = _Op(future, rows=rows, reserved=size, is_append=True)
        self._enqueue(op)
        self._reserved += size
        try:
            return await future
        except asyncio.CancelledError:
            # Not in a transaction yet: withdraw it, so it neither lands nor holds room.
            with self._lock:
                withdrawn = any(queued is op for queued in self._pending)
                if withdrawn:
                    self._pending = [queued for queued in self._pending if queued is not op]
            if withdrawn:
                self._reserved -= op.reserved
            raise

    async def remove(self, seqs: list[int]) -> None:
        """Delete delivered events (unknown seqs are ignored); returns after the commit."""
        if not seqs:
            return
        future: asyncio.Future[None] = self._loop.create_future()
        self._enqueue(_Op(future, removes=list(seqs)))
        await future

    def remove_soon(self, seqs: list[int]) -> None:
        """Delete delivered events in the next group commit, without waiting for it."""
        if not seqs:
            return
        if not self._accepting:
            # The row stays and is delivered again after a restart, under the same event_id.
            log.warning("spool_closed_remove_dropped", seqs=seqs[:20], count=len(seqs))
            return
        self._enqueue(_Op(None, removes=list(seqs)))

    async def settle_dead(self, seq: int | None, event: Event, note: DeadLetterNote) -> None:
        """Record a dead letter and delete event `seq` (if given) in one transaction."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._enqueue(_dead_op(future, seq, event, note))
        await future

    def dead_letter_soon(self, seq: int | None, event: Event, note: DeadLetterNote) -> None:
        """`settle_dead` in the next group commit, without waiting for it."""
        if not self._accepting:
            # The event's row stays, so it is attempted again after a restart: nothing is lost.
            log.warning(
                "spool_closed_dead_letter_dropped",
                seq=seq,
                event_id=event.event_id,
                reason=note.reason,
            )
            return
        self._enqueue(_dead_op(None, seq, event, note))

    async def read_after(self, seq: int, limit: int) -> list[SpooledEvent]:
        """Events with a seq above `seq`, oldest first, at most `limit` of them.

        Rows that are not a valid event are moved to the dead letters (reason "damaged")
        and skipped; an empty list therefore always means there is nothing after `seq`.
        """
        if limit <= 0:
            return []
        return await self._run(self._read_job, seq, limit)

    async def refresh(self) -> int:
        """Count in rows other processes added (`forwarder dlq replay`); returns how many.

        Also re-reads the dead-letter count. The new rows all have seq > `added_after`.
        """
        count, after = await self._run(self._refresh_job)
        if count:
            self.added_after = _last_seq(after)
        return count

    # -- group commit (event loop side) -------------------------------------------------------

    def _enqueue(self, op: _Op) -> None:
        if not self._accepting:
            raise SpoolError(f"the spool {self.path} is closed")
        with self._lock:
            if not self._pending:
                self._first_at = time.monotonic()
            self._pending.append(op)
            submit = not self._scheduled
            self._scheduled = True
        if submit:
            try:
                job = self._executor.submit(self._group_job)
            except RuntimeError as exc:  # the executor is shut down: nothing was written
                with self._lock:
                    self._pending = [queued for queued in self._pending if queued is not op]
                    self._scheduled = False
                raise SpoolError(f"the spool {self.path} is closed") from exc
            self._group_jobs.add(job)
            job.add_done_callback(self._group_jobs.discard)

    def _apply(
        self,
        totals: _Totals,
        results: list[tuple[_Op, Any]],
        took: float | None,
    ) -> None:
        """On the loop, after a commit: publish the counters, then wake the callers."""
        self._publish(totals)
        for op, value in results:
            self._reserved -= op.reserved
            if op.future is not None and not op.future.done():
                op.future.set_result(value)
        if took is not None and self._on_commit is not None:
            try:
                self._on_commit(took)
            except Exception as exc:  # a metrics hook must not break the spool
                log.error("spool_on_commit_failed", error=repr(exc))

    def _refuse(self, refused: list[tuple[_Op, str]]) -> None:
        """On the loop: these requests hold text SQLite cannot store; nothing of them was."""
        for op, why in refused:
            self._reserved -= op.reserved
            if op.future is None:
                log.error("spool_write_refused", path=str(self.path), error=why)
            elif not op.future.done():
                op.future.set_exception(ValueError(why))

    def _fail(self, ops: list[_Op], exc: BaseException) -> None:
        """On the loop, after a failed commit: nothing of `ops` was stored."""
        waiting = 0
        for op in ops:
            self._reserved -= op.reserved
            if op.future is not None:
                if not op.future.done():
                    # One instance per caller: a shared one would collect every task's traceback.
                    error = SpoolError(f"could not write to the spool {self.path}: {exc}")
                    error.__cause__ = exc
                    op.future.set_exception(error)
                    waiting += 1
            else:
                # Nobody awaits a *_soon request; the rows stay and are settled after a restart.
                log.error(
                    "spool_write_failed",
                    path=str(self.path),
                    error=str(exc),
                    removes=op.removes[:20],
                    dead_letter=op.dead is not None,
                )
        if waiting:
            log.error("spool_write_failed", path=str(self.path), error=str(exc), callers=waiting)

    def _publish(self, totals: _Totals) -> None:
        self.depth = totals.depth
        self.bytes = totals.bytes
        self.max_seq = _last_seq(totals.max_row)
        self.oldest_accepted_at = totals.oldest_accepted_at
        self.dead_letters = totals.dead_letters
        self.damaged = totals.damaged

    async def _run(self, job: Callable[..., _T], *args: Any) -> _T:
        if not self._accepting:
            raise SpoolError(f"the spool {self.path} is closed")
        return await self._loop.run_in_executor(self._executor, job, *args)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """From the thread: run `callback` on the loop, in the order the thread posted them."""
        self._loop.call_soon_threadsafe(callback, *args)

    # -- the spool thread ---------------------------------------------------------------------

    def _open_job(self, state_dir: Path) -> tuple[Path | None, str | None, _Totals]:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = self.path
        problem = _inspect(path)
        if problem is None and not path.exists() and _nonempty(_side(path, "-wal")):
            # A log without its database would be replayed into the new file: keep it apart.
            problem = "a write-ahead log without its database"
        moved = None if problem is None else _move_aside(path)
        conn = _connect_daemon(path)
        try:
            damaged = _upgrade(conn, path)
            totals = _load_totals(conn)
        except BaseException:
            conn.close()
            raise
        totals.damaged = damaged
        self._conn = conn
        self._t = totals
        return moved, problem, dataclasses.replace(totals)

    def _close_job(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()  # the last connection checkpoints the WAL into the database

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(f"the spool {self.path} is closed")
        return self._conn

    def _group_job(self) -> None:
        """On the thread: wait out the window of the oldest pending request, then commit them all.

        The window is waited only under load, when the last commit ended less than a window
        ago: a request to an idle spool is committed at once (a window would only add to its
        latency), while back-to-back commits, each with its fsync and per-transaction work,
        become fewer and larger. Requests that arrive while this group is written wait for the
        next job, which the first of them submitted and which runs right after this one.
        """
        now = time.monotonic()
        if now - self._last_commit_at < self._window:
            with self._lock:
                delay = self._first_at + self._window - now
            if delay > 0:
                self._cut.wait(delay)
        with self._lock:
            ops, self._pending = self._pending, []
            self._scheduled = False
        if ops:  # empty when every request was withdrawn during the window
            self._commit_job(ops)
            self._last_commit_at = time.monotonic()

    def _commit_job(self, ops: list[_Op]) -> None:
        """One transaction for every request in `ops`; reports back through `_post`."""
        try:
            try:
                totals, results, took = self._commit(ops)
            except UnicodeEncodeError:
                # sqlite3 cannot bind a str holding a lone surrogate. Appends never hold one (the
                # encoder refuses them on the loop), but a dead letter's error text might: this
                # path is all but never taken, so the culprit is sought only now. The transaction
                # was rolled back; it is redone without the requests that hold such text.
                refused = [(op, why) for op in ops if (why := _unstorable(op))]
                if not refused:
                    raise
                self._post(self._refuse, refused)
                ops = [op for op in ops if all(op is not bad for bad, _why in refused)]
                if not ops:
                    return
                totals, results, took = self._commit(ops)
        except Exception as exc:
            self._post(self._fail, ops, exc)
            return
        self._post(self._apply, totals, results, took)

    def _commit(self, ops: list[_Op]) -> tuple[_Totals, list[tuple[_Op, Any]], float]:
        conn = self._db()
        t = dataclasses.replace(self._t)
        rows = [row for op in ops for row in op.rows]
        dead = [op.dead for op in ops if op.dead is not None]
        settles = sorted({seq for op in ops for seq in op.removes})
        first = 0
        seen_up_to = t.max_row
        if rows and not dead and not settles and len(rows) <= _ROWS_PER_INSERT:
            # The common group, appends alone: one INSERT is its own transaction (autocommit),
            # one SQLite call instead of three. Every call gives up the GIL and must take it
            # back from the busy event loop, which costs the loop more than the call itself.
            started = time.perf_counter()
            cursor = conn.execute(_INSERT_BATCHES[len(rows)], list(chain.from_iterable(rows)))
            took = time.perf_counter() - started
            last = int(cursor.lastrowid or 0)
            first = last - len(rows) + 1
            foreign = self._count_in(conn, t, rows, first, last)
        else:
            first, foreign, took = self._transaction(conn, t, rows, dead, settles)
        self._t = t
        self._note_foreign(foreign, seen_up_to)
        results: list[tuple[_Op, Any]] = []
        for op in ops:
            if op.is_append:
                seqs: list[int] = []
                for count, *_rest in op.rows:
                    base = first << ROW_BITS
                    seqs.extend(range(base, base + count))
                    first += 1
                results.append((op, seqs))
            else:
                results.append((op, None))
        return dataclasses.replace(t), results, took

    def _transaction(
        self,
        conn: sqlite3.Connection,
        t: _Totals,
        rows: list[_BatchRow],
        dead: list[_DeadRow],
        settles: list[int],
    ) -> tuple[int, int, float]:
        """Appends, dead letters and settlements in one transaction; returns (first row,
        rows other processes added, commit time)."""
        first = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            foreign = 0
            if rows:
                # The rows' seqs come from the inserts themselves, with no query around them.
                first, last = _insert_batches(conn, rows)
                foreign = self._count_in(conn, t, rows, first, last)
            if dead:
                conn.executemany(_INSERT_DEAD, dead)
                t.dead_letters += len(dead)
            _settle(conn, t, settles)
            took = _commit_timed(conn)
        except BaseException:
            _rollback(conn)
            raise
        return first, foreign, took

    def _count_in(
        self, conn: sqlite3.Connection, t: _Totals, rows: list[_BatchRow], first: int, last: int
    ) -> int:
        """Count the rows just inserted as `first`..`last` into `t`; returns how many events
        other processes (`forwarder dlq replay`) added below them since we last looked."""
        if last - first + 1 != len(rows):
            raise SpoolError(f"rows {first}..{last} for {len(rows)} rows: not ours")
        foreign = self._catch_up(conn, t, below=first) if first - 1 > t.max_row else 0
        t.depth += sum(row[0] for row in rows)
        t.bytes += sum(row[_SIZE] for row in rows)
        t.max_row = last
        if t.min_row is None:
            t.min_row, t.oldest_accepted_at = first, rows[0][1]
        return foreign

    @staticmethod
    def _catch_up(conn: sqlite3.Connection, t: _Totals, below: int | None = None) -> int:
        """Count into `t` the events another process added since we last looked; returns how many.

        Only rows below `below`, if given (rows from there on are this process's own).
        `t.max_row` becomes the highest row seq given out so far (below `below`).
        """
        known = _highest_row(conn) if below is None else below - 1
        count = 0
        if known > t.max_row:
            count, size = conn.execute(
                "SELECT coalesce(sum(count), 0), coalesce(sum(size), 0) FROM batches"
                " WHERE seq > ? AND seq <= ?",
                (t.max_row, known),
            ).fetchone()
            t.depth += count
            t.bytes += size
            t.max_row = known
            if count and t.min_row is None:
                _load_oldest(conn, t)
        return int(count)

    def _note_foreign(self, count: int, after: int) -> None:
        """Remember events others added (in rows above `after`) until refresh() reports them."""
        if count:
            if not self._foreign:
                self._foreign_after = after
            self._foreign += count

    def _refresh_job(self) -> tuple[int, int]:
        conn = self._db()
        t = dataclasses.replace(self._t)
        seen_up_to = t.max_row
        conn.execute("BEGIN")  # one snapshot for both counts
        try:
            foreign = self._catch_up(conn, t)
            t.dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._t = t
        self._note_foreign(foreign, seen_up_to)
        count, after = self._foreign, self._foreign_after
        self._foreign = 0
        self._post(self._apply, dataclasses.replace(t), [], None)
        return count, after

    def _read_job(self, after: int, limit: int) -> list[SpooledEvent]:
        conn = self._db()
        good: list[SpooledEvent] = []
        bad_rows: list[tuple[Sequence[Any], str]] = []
        bad_events: list[tuple[int, object, str]] = []
        # Rows are stepped through lazily: one holds up to ROW_EVENTS events, so a LIMIT on rows
        # would either read far more than `limit` events or take many queries.
        cursor = conn.execute(
            _SELECT_BATCHES + " WHERE seq >= ? ORDER BY seq", (after >> ROW_BITS,)
        )
        try:
            while len(good) < limit and (chunk := cursor.fetchmany(_READ_ROWS)):
                settled = _settled_between(conn, chunk[0][0], chunk[-1][0])
                for row in chunk:
                    base = row[0] << ROW_BITS
                    try:
                        entries = _entries(row)
                    except ValueError as exc:
                        bad_rows.append((row, str(exc)))
                        continue
                    for index, entry in enumerate(entries):
                        seq = base | index
                        if seq <= after or seq in settled:
                            continue
                        try:
                            good.append(SpooledEvent(seq, _event_from_entry(entry)))
                        except ValueError as exc:
                            bad_events.append((seq, entry, str(exc)))
                            continue
                        if len(good) >= limit:
                            break
                    if len(good) >= limit:
                        break
        finally:
            cursor.close()
        if bad_rows or bad_events:
            self._quarantine(conn, bad_rows, bad_events)
        return good

    def _quarantine(
        self,
        conn: sqlite3.Connection,
        bad_rows: list[tuple[Sequence[Any], str]],
        bad_events: list[tuple[int, object, str]],
    ) -> None:
        """Move what is not a valid event into the dead letters (reason "damaged").

        A row that cannot be decoded goes whole, as one dead letter; an entry of a good row that
        is not an event goes alone, and its seq is settled like a delivered one.
        """
        now = time.time()
        dead = [_damaged_row(row, error, now) for row, error in bad_rows]
        dead += [_damaged_event(seq, entry, error, now) for seq, entry, error in bad_events]
        t = dataclasses.replace(self._t)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_DEAD, dead)
                for row, _error in bad_rows:
                    _drop_row(conn, t, row[0])
                _settle(conn, t, [seq for seq, _entry, _error in bad_events])
                t.dead_letters += len(dead)
                t.damaged += len(dead)
                took = _commit_timed(conn)
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            # Skipped this time all the same; the next read meets them again.
            log.error("spool_quarantine_failed", path=str(self.path), error=str(exc))
            return
        self._t = t
        errors = [error for _row, error in bad_rows] + [error for *_, error in bad_events]
        log.error(
            "spool_rows_damaged",
            path=str(self.path),
            rows=[row[0] for row, _error in bad_rows][:20],
            seqs=[seq for seq, _entry, _error in bad_events][:20],
            count=len(dead),
            error=errors[0],
        )
        self._post(self._apply, dataclasses.replace(t), [], took)


# -- encoding ---------------------------------------------------------------------------------


# One encoder for every dead-letter body: json.dumps with options builds a fresh one per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _body(event: Event) -> str:
    """An event as a dead-letter body (JSON); ValueError if it holds text SQLite cannot store."""
    body = _ENCODE(event.to_dict())
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        # Caught here, at the caller, rather than failing a whole shared transaction later.
        raise ValueError(f"event {event.event_id!r} holds text that is not valid Unicode") from None
    return body


def _encode(events: list[Event]) -> list[_BatchRow]:
    """Events as rows of the batches table: up to ROW_EVENTS of them to a row, in order.

    This runs on the event loop for every durable admission: one orjson call per row, over
    tuples of attributes. A row's size is its body's length, the bytes `queue.max_disk_bytes`
    bounds. ValueError names an event holding text that is not valid Unicode (a lone surrogate),
    which could not be stored.
    """
    rows: list[_BatchRow] = []
    for start in range(0, len(events), ROW_EVENTS):
        chunk = events[start : start + ROW_EVENTS]
        try:
            body = orjson.dumps(
                [
                    (
                        e.event_id,
                        e.recipient_id,
                        e.name,
                        e.value,
                        e.conversion,
                        e.data,
                        e.ref,
                        e.accepted_at,
                        e.account,
                    )
                    for e in chunk
                ]
            )
        except orjson.JSONEncodeError:
            culprit = next((e for e in chunk if not _is_utf8_event(e)), chunk[0])
            raise ValueError(
                f"event {culprit.event_id!r} holds text that is not valid Unicode"
            ) from None
        rows.append((len(chunk), chunk[0].accepted_at, len(body), body))
    return rows


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_utf8_event(e: Event) -> bool:
    return all(
        _is_utf8(text)
        for text in (e.event_id, e.recipient_id, e.name, e.value, e.data, e.ref, e.account)
    )


def _unstorable(op: _Op) -> str | None:
    """Why `op` holds text SQLite cannot store (a lone surrogate), or None if it holds none."""
    if op.dead is not None and not all(
        _is_utf8(value) for value in op.dead if isinstance(value, str)
    ):
        return f"dead letter of {op.dead[0]!r} holds text that is not valid Unicode"
    return None


def _entries(row: Sequence[Any]) -> list[object]:
    """The entries in a row of _SELECT_BATCHES; ValueError says why the row cannot be read.

    SQLite's column types are only affinities, so every type is checked: this is on the read
    path, not admission's.
    """
    _seq, count, _accepted_at, body = row
    if type(count) is not int or not 0 < count <= ROW_EVENTS:
        raise ValueError(f"not a row of events: count is {count!r}")
    if not isinstance(body, bytes | str):
        raise ValueError(f"not a row of events: body is {type(body).__name__}")
    try:
        entries = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not a row of events: body is not JSON: {exc}") from None
    if type(entries) is not list or len(entries) != count:
        raise ValueError(f"not a row of events: body is not a list of {count}")
    return entries


def _event_from_entry(entry: object) -> Event:
    """The event an entry of a row holds; ValueError says why it is not one."""
    if type(entry) is not list or len(entry) != len(_ENTRY_FIELDS):
        raise ValueError(f"not an event: not a list of {len(_ENTRY_FIELDS)}")
    event_id, recipient_id, name, value, conversion, data, ref, accepted_at, account = entry
    texts = (event_id, recipient_id, name, value, data, ref, account)
    if not all(type(text) is str for text in texts):
        wrong = [
            n
            for n, v in zip(_ENTRY_FIELDS, entry, strict=True)
            if n in _TEXT_FIELDS and type(v) is not str
        ]
        raise ValueError(f"not an event: {', '.join(wrong)} not text")
    if not event_id or not recipient_id or not name:
        raise ValueError("not an event: empty event_id, recipient_id or name")
    if type(conversion) is not bool:
        raise ValueError(f"not an event: conversion is {conversion!r}, not true or false")
    if type(accepted_at) is not float and type(accepted_at) is not int:
        raise ValueError(f"not an event: accepted_at is {accepted_at!r}, not a number")
    return Event(
        event_id,
        recipient_id,
        # Shared copies: a window of 100 000 reloaded events holds a handful of distinct ones.
        shared_name(name),
        value,
        conversion,
        data,
        ref,
        float(accepted_at),
        shared_name(account),
    )


# The order of an entry's fields (see _encode), for the messages about a damaged one.
_ENTRY_FIELDS = (
    "event_id", "recipient_id", "name", "value", "conversion", "data", "ref", "accepted_at",
    "account",
)  # fmt: skip
_TEXT_FIELDS = frozenset(_ENTRY_FIELDS) - {"conversion", "accepted_at"}


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def _damaged_row(row: Sequence[Any], error: str, now: float) -> _DeadRow:
    """A dead letter (reason "damaged") for a row of _SELECT_BATCHES that cannot be read.

    Its body keeps the row as it was, wrapped so that it never reads as an event record: a
    replay must not send something rebuilt from a damaged row.
    """
    columns = dict(zip(("seq", "count", "accepted_at", "body"), map(_jsonable, row), strict=True))
    body = _ENCODE({"damaged_spool_row": columns})
    return (None, "", "damaged", None, f"spool row {row[0]}: {error}", 0, 0.0, 0.0, now, body)


def _damaged_event(seq: int, entry: object, error: str, now: float) -> _DeadRow:
    """A dead letter (reason "damaged") for an entry of a row that is not an event."""
    event_id = account = None
    if type(entry) is list and len(entry) == len(_ENTRY_FIELDS):
        event_id = entry[0] if type(entry[0]) is str else None
        account = entry[-1] if type(entry[-1]) is str else None
    body = _ENCODE({"damaged_spool_row": {"seq": seq, "event": entry}})
    error = f"spool event {seq}: {error}"
    return (event_id, account or "", "damaged", None, error, 0, 0.0, 0.0, now, body)


def _dead_row(event: Event, note: DeadLetterNote, dead_lettered_at: float) -> _DeadRow:
    body = _body(event)
    return (
        event.event_id,
        event.account,
        note.reason,
        note.status,
        note.error,
        note.attempts,
        note.first_attempt_at,
        note.last_attempt_at,
        dead_lettered_at,
        body,
    )


def _dead_op(
    future: asyncio.Future[None] | None, seq: int | None, event: Event, note: DeadLetterNote
) -> _Op:
    row = _dead_row(event, note, time.time())
    return _Op(future, dead=row, removes=[] if seq is None else [seq])


def _decode(body: object) -> Event:
    """The event stored in `body`; ValueError says why it is not one."""
    if not isinstance(body, str):
        raise ValueError(f"body is {type(body).__name__}, not text")
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("body is not a JSON object")
    try:
        return Event.from_dict(raw)
    except TypeError as exc:
        raise ValueError(f"not an event record: {exc}") from None


def _event_id_of(body: object) -> str | None:
    """The event_id of a damaged body, if one can still be read from it."""
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        raw = json.loads(body) if isinstance(body, str) else None
        if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
            return str(raw["event_id"])
    return None


def _dead_letter_from_row(row: Sequence[Any]) -> DeadLetter:
    (id_, event_id, account, reason, status, error, attempts, first, last, at, body) = row
    try:
        event = _decode(body)
    except ValueError:
        event = Event(
            event_id=event_id or "",
            recipient_id="",
            name="",
            data=body if isinstance(body, str) else repr(body),
            account=account or "",
        )
    return DeadLetter(
        id=id_,
        event=event,
        reason=reason or "",
        status=status,
        error=error or "",
        attempts=attempts or 0,
        first_attempt_at=first or 0.0,
        last_attempt_at=last or 0.0,
        dead_lettered_at=at or 0.0,
    )


# -- database helpers (any thread, one connection each) ---------------------------------------


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _is_damage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _examine(
    conn: sqlite3.Connection, *, quick_check: bool = True, upgradable: bool = False
) -> str | None:
    """Why this database is not a usable spool ("" if it is blank), or None if it is one.

    With `upgradable`, a spool of an older schema this version can upgrade counts as usable (the
    daemon upgrades it at open); without, it is a problem (the CLI never upgrades: a daemon of
    the older version may still be running on it). Raises sqlite3.Error when SQLite cannot read
    it at all.
    """
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if app_id == 0 and version == 0 and not tables:
        return ""  # a new file whose creation was cut short, or an empty one
    if app_id != APPLICATION_ID:
        return f"foreign: application_id {app_id:#x}, not {APPLICATION_ID:#x}"
    if version > SCHEMA_VERSION:
        return f"from a newer forwarder: schema version {version}, this one knows {SCHEMA_VERSION}"
    if version not in _EVENTS_TABLE or not {*_EVENTS_TABLE[version], "dead_letters"} <= tables:
        return f"damaged: schema version {version}, tables {sorted(tables)}"
    [(table, expected)] = [(t, c) for t, c in _EVENTS_TABLE[version].items() if c]
    columns = {str(row[1]) for row in conn.execute(f"PRAGMA table_info({table})")}
    if missing := expected - columns:
        # Caught here, so the file is moved aside instead of failing every write (or upgrade).
        return f"damaged: schema version {version}, {table} lack {', '.join(sorted(missing))}"
    if version != SCHEMA_VERSION and not upgradable:
        return (
            f"from an older forwarder: schema version {version}; the daemon of this version"
            f" upgrades it to {SCHEMA_VERSION} when it starts"
        )
    if quick_check:
        found = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
        if found != ["ok"]:
            return "damaged: quick_check: " + "; ".join(found)
    return None


def _inspect(path: Path) -> str | None:
    """Why the file at `path` must be moved aside, or None (absent, blank or a good spool)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_MAGIC))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SpoolError(f"cannot read the spool {path}: {exc}") from exc
    if head and head != _MAGIC:
        return "damaged: not an SQLite database (bad header)"
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open the spool {path}: {exc}") from exc
    try:
        problem = _examine(conn, upgradable=True)
    except sqlite3.Error as exc:
        if _is_damage(exc):
            return f"damaged: {exc}"
        raise SpoolError(f"cannot check the spool {path}: {exc}") from exc
    finally:
        conn.close()
    return problem or None


def _move_aside(path: Path) -> Path:
    """Rename the database and its WAL/SHM files to `<name>.damaged-<UTC time>[-N]`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 0
    while any(_side(base, s).exists() for s in ("", *_SIDE_FILES)):
        n += 1
        base = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # The database first: a crash in between leaves an orphan WAL, which the next open handles.
    for suffix in ("", *_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.rename(_side(path, suffix), _side(base, suffix))
    _fsync_dir(path.parent)
    return base


def _connect_daemon(path: Path) -> sqlite3.Connection:
    """Open the daemon's connection, creating the file (mode 0600) and schema if needed."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SpoolError(f"cannot create the spool {path}: {exc}") from exc
    else:
        os.close(fd)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open the spool {path}: {exc}") from exc
    try:
        # Set before WAL mode and the first table, so only a new file takes it. A row holds a
        # request's events (up to ROW_EVENTS, about 15 kB for 100): with 16 kB pages a group
        # commit writes half the WAL frames (and system calls) of 4 kB pages, and costs the
        # spool thread about a quarter less CPU. An existing file keeps its page size.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"the spool {path} cannot use WAL mode (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        # Keep a burst's WAL from staying on disk at its peak size after a checkpoint.
        conn.execute("PRAGMA journal_size_limit=67108864")
        if _examine(conn, quick_check=False, upgradable=True) == "":
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            _fsync_dir(path.parent)
        # SQLite gives -wal/-shm the database's mode; narrow all three in case it was wider.
        for suffix in ("", *_SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(_side(path, suffix), 0o600)
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"cannot set up the spool {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _upgrade(conn: sqlite3.Connection, path: Path) -> int:
    """Bring a spool of an older schema up to SCHEMA_VERSION; returns the rows found damaged.

    One transaction: a crash or an error leaves the file as it was, to be upgraded at the next
    open. Every event is kept, under its seq; one that cannot be read goes to the dead letters
    (reason "damaged"), as read_after would have done with it.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return 0
    started = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have upgraded it meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            conn.execute("COMMIT")
            return 0
        moved, damaged = _UPGRADES[version](conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    log.warning(
        "spool_upgraded",
        path=str(path),
        from_version=version,
        to_version=SCHEMA_VERSION,
        events=moved,
        damaged=damaged,
        seconds=round(time.monotonic() - started, 3),
    )
    return damaged


def _upgrade_rows(
    conn: sqlite3.Connection,
    version: int,
    columns: str,
    to_event: Callable[[Sequence[Any]], Event],
    damaged: Callable[[Sequence[Any], str, float], _DeadRow],
) -> tuple[int, int]:
    """An event-per-row table to the batches table; returns (events moved, damaged).

    Every event keeps its place: old seq N becomes a one-event row N (event seq N << ROW_BITS).
    """
    conn.execute("ALTER TABLE events RENAME TO events_old")
    for statement in _SCHEMA:
        conn.execute(statement)
    moved = bad_count = 0
    now = time.time()
    # A pending SELECT may go on while the same connection writes to other tables.
    reader = conn.execute(f"SELECT seq, {columns} FROM events_old ORDER BY seq")
    while chunk := reader.fetchmany(CHUNK_ROWS):
        good: list[tuple[Any, ...]] = []
        bad: list[_DeadRow] = []
        for row in chunk:
            try:
                # Checked row by row here (a rare path): one bad row must not fail the upgrade.
                [encoded] = _encode([to_event(row)])
            except ValueError as exc:
                bad.append(damaged(row, f"{exc} (found upgrading schema {version})", now))
                continue
            good.append((row[0], *encoded))
        conn.executemany(_INSERT_BATCH_AT, good)
        conn.executemany(_INSERT_DEAD, bad)
        moved += len(good)
        bad_count += len(bad)
    # AUTOINCREMENT's record moved with the renamed table: carry it over, so no seq is reused.
    record = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events_old'").fetchone()
    top = max(
        record[0] if record else 0,
        conn.execute("SELECT max(seq) FROM events_old").fetchone()[0] or 0,
    )
    conn.execute("DROP TABLE events_old")  # every row of it is in batches or dead_letters now
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'events_old'")
    if top:
        updated = conn.execute(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'batches'", (top,)
        ).rowcount
        if not updated:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('batches', ?)", (top,))
    return moved, bad_count


def _upgrade_from_1(conn: sqlite3.Connection) -> tuple[int, int]:
    """Schema 1 (a JSON body per event) to rows of events; returns (events moved, damaged)."""

    def damaged(row: Sequence[Any], error: str, now: float) -> _DeadRow:
        seq, account, body = row
        error = f"spool row {seq}: {error}"
        return (_event_id_of(body), account, "damaged", None, error, 0, 0.0, 0.0, now, body)

    return _upgrade_rows(conn, 1, "account, body", lambda row: _decode(row[2]), damaged)


# The columns of schema 2's events table that held an event.
_V2_COLUMNS = (
    "seq", "account", "event_id", "recipient_id", "name", "value", "conversion", "data", "ref",
    "accepted_at",
)  # fmt: skip


def _upgrade_from_2(conn: sqlite3.Connection) -> tuple[int, int]:
    """Schema 2 (typed columns, an event per row) to rows of events; returns the same."""

    def to_event(row: Sequence[Any]) -> Event:
        _seq, account, event_id, recipient_id, name, value, conversion, data, ref, at = row
        if type(conversion) is int and conversion in (0, 1):
            conversion = conversion == 1
        return _event_from_entry(
            [event_id, recipient_id, name, value, conversion, data, ref, at, account]
        )

    def damaged(row: Sequence[Any], error: str, now: float) -> _DeadRow:
        columns = dict(zip(_V2_COLUMNS, map(_jsonable, row), strict=True))
        body = _ENCODE({"damaged_spool_row": columns})
        event_id = row[2] if type(row[2]) is str else None
        account = row[1] if type(row[1]) is str else ""
        error = f"spool row {row[0]}: {error}"
        return (event_id, account, "damaged", None, error, 0, 0.0, 0.0, now, body)

    return _upgrade_rows(conn, 2, ", ".join(_V2_COLUMNS[1:]), to_event, damaged)


# How to upgrade each older schema version to SCHEMA_VERSION.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], tuple[int, int]]] = {
    1: _upgrade_from_1,
    2: _upgrade_from_2,
}
# The tables of each schema version this one can use, with the columns it needs of them.
_EVENTS_TABLE: dict[int, dict[str, frozenset[str]]] = {
    1: {"events": frozenset({"seq", "account", "body"})},
    2: {"events": frozenset(_V2_COLUMNS)},
    SCHEMA_VERSION: {
        "batches": frozenset({"seq", "count", "accepted_at", "size", "body"}),
        "settled": frozenset(),
    },
}


def _load_totals(conn: sqlite3.Connection) -> _Totals:
    conn.execute("BEGIN")  # one snapshot for every count
    try:
        return _load_totals_in(conn)
    finally:
        conn.execute("COMMIT")


def _load_totals_in(conn: sqlite3.Connection) -> _Totals:
    t = _Totals()
    count, size = conn.execute(
        "SELECT coalesce(sum(count), 0), coalesce(sum(size), 0) FROM batches"
    ).fetchone()
    t.depth = count - conn.execute("SELECT count(*) FROM settled").fetchone()[0]
    t.bytes = size
    t.max_row = _highest_row(conn)
    _load_oldest(conn, t)
    t.dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return t


def _highest_row(conn: sqlite3.Connection) -> int:
    """The highest row seq ever given out: AUTOINCREMENT's record, or a row above it."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
    top = conn.execute("SELECT max(seq) FROM batches").fetchone()[0]
    return max(row[0] if row else 0, top or 0)


def _last_seq(row: int) -> int:
    """The highest event seq row `row` can hold: every seq up to it is in rows up to `row`."""
    return row << ROW_BITS | _INDEX_MASK


def _load_oldest(conn: sqlite3.Connection, t: _Totals) -> None:
    row = conn.execute("SELECT seq, accepted_at FROM batches ORDER BY seq LIMIT 1").fetchone()
    t.min_row, t.oldest_accepted_at = (row[0], row[1]) if row else (None, None)


def _insert_batches(conn: sqlite3.Connection, rows: Sequence[_BatchRow]) -> tuple[int, int]:
    """Insert `rows` in order, in multi-row statements; returns the first and last row seq.

    Within a write transaction AUTOINCREMENT numbers them one after another; the statements'
    `lastrowid` say where they landed.
    """
    done, total = 0, len(rows)
    first = last = 0
    while done < total:
        count = min(_ROWS_PER_INSERT, total - done)
        cursor = conn.execute(
            _INSERT_BATCHES[count], list(chain.from_iterable(rows[done : done + count]))
        )
        last = int(cursor.lastrowid or 0)
        if not done:
            first = last - count + 1
        done += count
    return first, last


def _settled_between(conn: sqlite3.Connection, first_row: int, last_row: int) -> set[int]:
    """The settled event seqs of rows `first_row`..`last_row`."""
    return {
        seq
        for (seq,) in conn.execute(
            "SELECT seq FROM settled WHERE seq BETWEEN ? AND ?",
            (first_row << ROW_BITS, _last_seq(last_row)),
        )
    }


def _settle(conn: sqlite3.Connection, t: _Totals, seqs: Sequence[int]) -> None:
    """Settle events (delivered or dead-lettered), taking them out of the totals.

    A row goes once every event in it is settled; until then its settled events are listed in
    `settled`. Seqs of unknown rows, or settled already, are ignored.
    """
    by_row: dict[int, set[int]] = {}
    for seq in seqs:
        by_row.setdefault(seq >> ROW_BITS, set()).add(seq)
    for row, mine in by_row.items():
        found = conn.execute("SELECT count, size FROM batches WHERE seq = ?", (row,)).fetchone()
        if found is None or type(found[0]) is not int:
            continue
        count = found[0]
        base = row << ROW_BITS
        new = [(seq,) for seq in mine if seq - base < count]
        if count == 1:  # a single-event request's row: nothing to list, the row just goes
            if new:
                t.depth -= 1
                _drop_row(conn, t, row, counted=True, found=found)
            continue
        # Counted, not listed: a row of 1000 events is settled one event at a time.
        added = conn.executemany("INSERT OR IGNORE INTO settled (seq) VALUES (?)", new).rowcount
        if added <= 0:
            continue
        t.depth -= added
        done = conn.execute(
            "SELECT count(*) FROM settled WHERE seq BETWEEN ? AND ?", (base, _last_seq(row))
        ).fetchone()[0]
        if done >= count:
            _drop_row(conn, t, row, counted=True, found=found)
    if t.min_row is None:
        _load_oldest(conn, t)


def _drop_row(
    conn: sqlite3.Connection,
    t: _Totals,
    row: int,
    *,
    counted: bool = False,
    found: tuple[Any, Any] | None = None,
) -> None:
    """Delete a row and its settled seqs; unless `counted`, its unsettled events leave depth.

    `found`: the row's (count, size), if the caller has read them already.
    """
    if found is None:
        found = conn.execute("SELECT count, size FROM batches WHERE seq = ?", (row,)).fetchone()
        if found is None:
            return
    count, size = found
    settled = 0
    if count != 1:  # a one-event row never has settled seqs listed
        settled = conn.execute(
            "DELETE FROM settled WHERE seq BETWEEN ? AND ?", (row << ROW_BITS, _last_seq(row))
        ).rowcount
    conn.execute("DELETE FROM batches WHERE seq = ?", (row,))
    if not counted and type(count) is int:
        t.depth -= max(0, count - settled)
    t.bytes -= size if type(size) is int else 0
    if row == t.min_row:
        _load_oldest(conn, t)


def _commit_timed(conn: sqlite3.Connection) -> float:
    """COMMIT; returns how long it took (the WAL write and its fsync), for the histogram."""
    started = time.perf_counter()
    conn.execute("COMMIT")
    return time.perf_counter() - started


def _chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _fsync_dir(path: Path) -> None:
    # A new or renamed file's directory entry is only durable once the directory is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the CLI's helpers (synchronous, own connection) -------------------------------------------


def open_readonly_or_fail(state_dir: Path, *, quick_check: bool = True) -> sqlite3.Connection:
    """Open an existing spool for the CLI; SpoolError if it is missing, foreign or damaged.

    "Readonly" towards the file's existence: it never creates, repairs or moves anything aside.
    The connection can write (replay, purge), in short transactions that wait up to
    BUSY_TIMEOUT_S for the daemon's lock. Pass `quick_check=False` to skip the full-file check.
    """
    path = state_dir / SPOOL_FILE
    if not path.is_file():
        raise SpoolError(f"no spool at {path}")
    problem = _inspect_header(path)
    if problem:
        raise SpoolError(f"the spool {path} is {problem}")
    try:
        conn = sqlite3.connect(
            path.resolve().as_uri() + "?mode=rw",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_S,
        )
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open the spool {path}: {exc}") from exc
    try:
        problem = _examine(conn, quick_check=quick_check)
        if problem is not None:
            raise SpoolError(f"the spool {path} is {problem or 'empty (never set up)'}")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"cannot read the spool {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _inspect_header(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_MAGIC))
    except OSError as exc:
        raise SpoolError(f"cannot read the spool {path}: {exc}") from exc
    if head != _MAGIC:
        return "damaged: not an SQLite database (bad header)"
    return None


def list_dead_letters(
    conn: sqlite3.Connection,
    *,
    since: float | None = None,
    reason: str | None = None,
    limit: int | None = None,
) -> list[DeadLetter]:
    """Dead letters in the order they came, optionally dead-lettered at/after `since`, by reason."""
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append("dead_lettered_at >= ?")
        params.append(since)
    if reason is not None:
        where.append("reason = ?")
        params.append(reason)
    sql = f"SELECT {_DEAD_COLUMNS} FROM dead_letters"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_dead_letter_from_row(row) for row in conn.execute(sql, params)]


def get_dead_letter(conn: sqlite3.Connection, id: int) -> DeadLetter | None:
    """One dead letter by id, or None."""
    row = conn.execute(f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE id = ?", (id,)).fetchone()
    return None if row is None else _dead_letter_from_row(row)


def replay_dead_letters(
    conn: sqlite3.Connection,
    ids: list[int] | None,
    *,
    progress: Callable[[int], None] | None = None,
    chunk: int = CHUNK_ROWS,
) -> int:
    """Move dead letters (all if `ids` is None) back into the events; returns how many.

    Each becomes a new event row at the end of the spool, the same event with the same event_id
    (its idempotency key), and its dead-letter row goes in the same transaction. Works in
    transactions of `chunk` rows; `progress(total so far)` is called after each. Rows whose body
    is not a valid event (reason "damaged") are left where they are; unknown ids are ignored.
    """
    total = 0
    if ids is None:
        cursor = 0
        while True:
            count, last = _replay_chunk(
                conn,
                "SELECT id, body FROM dead_letters WHERE id > ? ORDER BY id LIMIT ?",
                [cursor, max(1, chunk)],
            )
            if last is None:
                break
            cursor = last
            total += count
            if progress is not None:
                progress(total)
        return total
    # An id list is bound as parameters, so its chunks also stay under SQLite's parameter limit.
    for part in _chunks(sorted(set(ids)), max(1, min(chunk, _IN_CHUNK))):
        marks = ",".join("?" * len(part))
        moved, _last = _replay_chunk(
            conn, f"SELECT id, body FROM dead_letters WHERE id IN ({marks}) ORDER BY id", part
        )
        total += moved
        if progress is not None:
            progress(total)
    return total


def _replay_chunk(
    conn: sqlite3.Connection, select: str, params: Sequence[Any]
) -> tuple[int, int | None]:
    """Replay the rows `select` finds, in one transaction; returns (moved, last id seen)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(select, params).fetchall()
        events: list[Event] = []
        ids: list[tuple[int]] = []
        for id_, body in rows:
            try:
                # Checked one by one: one bad body must not stop a replay.
                event = _decode(body)
                _encode([event])
            except ValueError:
                continue
            events.append(event)
            ids.append((id_,))
        if events:
            _insert_batches(conn, _encode(events))
            conn.executemany("DELETE FROM dead_letters WHERE id = ?", ids)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return len(events), (rows[-1][0] if rows else None)


def purge_dead_letters(
    conn: sqlite3.Connection,
    before: float,
    progress: Callable[[int], None] | None = None,
    *,
    chunk: int = CHUNK_ROWS,
) -> int:
    """Delete dead letters dead-lettered before `before` (epoch seconds); returns how many.

    Works in transactions of `chunk` rows; `progress(total so far)` is called after each.
    """
    total = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            deleted = conn.execute(
                "DELETE FROM dead_letters WHERE id IN"
                " (SELECT id FROM dead_letters WHERE dead_lettered_at < ? LIMIT ?)",
                (before, chunk),
            ).rowcount
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if deleted <= 0:
            return total
        total += deleted
        if progress is not None:
            progress(total)


def spooled_events(conn: sqlite3.Connection) -> list[Event]:
    """Every unsettled event in the spool, oldest first; ValueError if one cannot be read.

    For inspection and tests: it reads all of them into memory, and leaves damaged rows where
    they are (the daemon's read moves them to the dead letters).
    """
    events: list[Event] = []
    settled = {seq for (seq,) in conn.execute("SELECT seq FROM settled")}
    for row in conn.execute(_SELECT_BATCHES + " ORDER BY seq"):
        try:
            entries = _entries(row)
        except ValueError as exc:
            raise ValueError(f"spool row {row[0]}: {exc}") from None
        for index, entry in enumerate(entries):
            seq = row[0] << ROW_BITS | index
            if seq in settled:
                continue
            try:
                events.append(_event_from_entry(entry))
            except ValueError as exc:
                raise ValueError(f"spool event {seq}: {exc}") from None
    return events


def spool_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """What the spool holds: events, bytes, oldest, max seq, dead letters by reason, file sizes.

    "bytes" is the size of the rows that hold unsettled events (their encoded events: what
    `queue.max_disk_bytes` bounds); "file_bytes" is what the files take.
    """
    path = Path(next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"))
    conn.execute("BEGIN")  # one snapshot for every count
    try:
        t = _load_totals_in(conn)
        rows = conn.execute("SELECT count(*) FROM batches").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        by_reason = {
            str(reason): n
            for reason, n in conn.execute(
                "SELECT coalesce(reason, ''), count(*) FROM dead_letters GROUP BY 1 ORDER BY 1"
            )
        }
    finally:
        conn.execute("COMMIT")
    files = {}
    for suffix in ("", "-wal"):
        try:
            files[suffix] = _side(path, suffix).stat().st_size
        except FileNotFoundError:
            files[suffix] = 0
    return {
        "path": str(path),
        "events": t.depth,
        "rows": rows,
        "bytes": t.bytes,
        "oldest_accepted_at": t.oldest_accepted_at,
        "max_seq": _last_seq(t.max_row),
        "schema_version": version,
        "dead_letters": by_reason,
        "dead_letters_total": sum(by_reason.values()),
        "file_bytes": files[""] + files["-wal"],
        "wal_bytes": files["-wal"],
    }


# --- the pending file of older versions -----------------------------------------------------
# Before the spool, a clean stop saved its leftovers to `pending.jsonl`; the daemon moves such a
# file into the spool at start, so one replay path serves every version's leftovers.

PENDING_FILE = "pending.jsonl"
REJECTED_FILE = "pending.rejected.jsonl"


@dataclass(slots=True)
class PendingLoad:
    """What was read back from the pending file."""

    events: list[Event] = field(default_factory=list)
    damaged_lines: int = 0


def save_pending(state_dir: Path, events: list[Event]) -> Path:
    """Append events to the pending file and fsync it (blocking: run it in a thread).

    Appending, never truncating, means a pending file that was not consumed (say, a failed start)
    is never overwritten.
    """
    path = state_dir / PENDING_FILE
    lines = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in events)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(state_dir)
    return path


def load_pending(state_dir: Path) -> PendingLoad:
    """Read the pending file (blocking: run it in a thread).

    Damaged lines (say, torn by a full disk) are copied to `pending.rejected.jsonl` and counted,
    so nothing is dropped without a trace. The caller removes the file once the events are queued.
    """
    path = state_dir / PENDING_FILE
    result = PendingLoad()
    if not path.exists():
        return result
    rejected: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                result.events.append(Event.from_dict(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                rejected.append(line if line.endswith("\n") else line + "\n")
    if rejected:
        result.damaged_lines = len(rejected)
        with (state_dir / REJECTED_FILE).open("a", encoding="utf-8") as handle:
            handle.writelines(rejected)
    return result


def remove_pending(state_dir: Path) -> None:
    """Remove the pending file after its events were queued (blocking)."""
    (state_dir / PENDING_FILE).unlink(missing_ok=True)
    _fsync_dir(state_dir)
