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

Events are stored in typed columns, one per field, rather than as a JSON body: admitting an event
then builds no dict and encodes no JSON on the event loop, which is most of what durable mode adds
to an admission. Dead letters (a rare path) keep the event as a JSON body.
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

import structlog

from forwarder.deadletter import DeadLetterNote
from forwarder.events import Event, shared_name

SPOOL_FILE = "spool.db"
APPLICATION_ID = 0x46574452  # "FWDR": PRAGMA application_id, to recognise our own files
# PRAGMA user_version. 1: events as a JSON body; 2: events in typed columns (upgraded at open).
SCHEMA_VERSION = 2
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

_CREATE_EVENTS = """CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    event_id TEXT NOT NULL,
    recipient_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    conversion INTEGER NOT NULL,
    data TEXT NOT NULL,
    ref TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    size INTEGER NOT NULL
)"""
_SCHEMA = (
    _CREATE_EVENTS,
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
_EVENT_COLUMNS = (
    "account, event_id, recipient_id, name, value, conversion, data, ref, accepted_at, size"
)
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows per INSERT, at most. One multi-row statement instead of one per row saves about a third
# of the insert's CPU: per-statement work (AUTOINCREMENT's bookkeeping among it) is paid once
# per chunk. 64 rows bind 640 values, under the 999 of older SQLite builds.
_ROWS_PER_INSERT = 64
# A statement for each power of two up to that: a few cached statements serve any group size.
_INSERT_EVENTS = {
    rows: f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES " + ", ".join([_ROW_MARKS] * rows)
    for rows in (1 << bits for bits in range(_ROWS_PER_INSERT.bit_length()))
}
# The schema 1 upgrade keeps every row's seq.
_INSERT_EVENT_AT = (
    f"INSERT INTO events (seq, {_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# What read_after needs to rebuild an Event: every column but size.
_SELECT_COLUMN_NAMES = (
    "seq",
    "account",
    "event_id",
    "recipient_id",
    "name",
    "value",
    "conversion",
    "data",
    "ref",
    "accepted_at",
)
_SELECT_EVENTS = f"SELECT {', '.join(_SELECT_COLUMN_NAMES)} FROM events"
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
# account, event_id, recipient_id, name, value, conversion, data, ref, accepted_at, size
_EventRow = tuple[str, str, str, str, str, int, str, str, float, int]
_SIZE: Final = 9  # the index of size in an _EventRow
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
    max_seq: int = 0  # every row with a seq up to here is counted in depth/bytes
    min_seq: int | None = None
    oldest_accepted_at: float | None = None
    dead_letters: int = 0
    damaged: int = 0


@dataclass(slots=True, eq=False)
class _Op:
    """One caller's request waiting for the next group commit."""

    future: asyncio.Future[Any] | None
    rows: list[_EventRow] = field(default_factory=list)
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
    max_seq: int
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
        self.bytes = 0  # the stored events' sizes: characters of their text (see _event_row)
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

    # -- opening and closing ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        max_bytes: int = 0,
        group_window_s: float = 0.002,
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
        spool.added_after = totals.max_seq
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
        rows = [_event_row(event) for event in events]
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
            self.added_after = after
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
        self.max_seq = totals.max_seq
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

        Requests that arrive while this group is written wait for the next job, which the first
        of them submitted and which runs right after this one.
        """
        with self._lock:
            delay = self._first_at + self._window - time.monotonic()
        if delay > 0:
            self._cut.wait(delay)
        with self._lock:
            ops, self._pending = self._pending, []
            self._scheduled = False
        if ops:  # empty when every request was withdrawn during the window
            self._commit_job(ops)

    def _commit_job(self, ops: list[_Op]) -> None:
        """One transaction for every request in `ops`; reports back through `_post`."""
        try:
            try:
                totals, results, took = self._commit(ops)
            except UnicodeEncodeError:
                # sqlite3 cannot bind a str holding a lone surrogate. Intake refuses those, so
                # this path is all but never taken: looking for the culprit only now keeps the
                # admission of every other event free of the check. The transaction was rolled
                # back; it is redone without the requests that hold such text.
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
        removes = sorted({seq for op in ops for seq in op.removes})
        first = 0
        seen_up_to = t.max_seq
        conn.execute("BEGIN IMMEDIATE")
        try:
            foreign = 0
            if rows:
                foreign = self._catch_up(conn, t)
                known = t.max_seq
                _insert_events(conn, rows)
                last = _highest_seq(conn)
                if last - known != len(rows):
                    raise SpoolError(f"seqs {known + 1}..{last} for {len(rows)} rows: not ours")
                first = known + 1
                t.depth += len(rows)
                t.bytes += sum(row[_SIZE] for row in rows)
                t.max_seq = last
            if dead:
                conn.executemany(_INSERT_DEAD, dead)
                t.dead_letters += len(dead)
            _delete_counted(conn, t, removes)
            took = _commit_timed(conn)
        except BaseException:
            _rollback(conn)
            raise
        self._t = t
        self._note_foreign(foreign, seen_up_to)
        results: list[tuple[_Op, Any]] = []
        for op in ops:
            if op.is_append:
                results.append((op, list(range(first, first + len(op.rows)))))
                first += len(op.rows)
            else:
                results.append((op, None))
        return dataclasses.replace(t), results, took

    @staticmethod
    def _catch_up(conn: sqlite3.Connection, t: _Totals) -> int:
        """Count into `t` the rows another process added since we last looked; returns how many.

        `t.max_seq` becomes the highest seq given out so far.
        """
        known = _highest_seq(conn)
        count = 0
        if known > t.max_seq:
            count, size = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM events WHERE seq > ?", (t.max_seq,)
            ).fetchone()
            t.depth += count
            t.bytes += size
            t.max_seq = known
            if count and t.min_seq is None:
                _load_oldest(conn, t)
        return int(count)

    def _note_foreign(self, count: int, after: int) -> None:
        """Remember rows others added (all above `after`) until refresh() reports them."""
        if count:
            if not self._foreign:
                self._foreign_after = after
            self._foreign += count

    def _refresh_job(self) -> tuple[int, int]:
        conn = self._db()
        t = dataclasses.replace(self._t)
        seen_up_to = t.max_seq
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
        cursor = after
        while len(good) < limit:
            want = limit - len(good)
            rows = conn.execute(
                _SELECT_EVENTS + " WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, want)
            ).fetchall()
            bad: list[tuple[tuple[Any, ...], str]] = []
            for row in rows:
                try:
                    good.append(SpooledEvent(row[0], _event_from_columns(row)))
                except ValueError as exc:
                    bad.append((row, str(exc)))
            if bad:
                self._quarantine(conn, bad)
            if len(rows) < want:
                break
            cursor = rows[-1][0]
        return good

    def _quarantine(self, conn: sqlite3.Connection, bad: list[tuple[tuple[Any, ...], str]]) -> None:
        """Move rows that are not a valid event into the dead letters (reason "damaged")."""
        now = time.time()
        dead = [_damaged_row(row, error, now) for row, error in bad]
        t = dataclasses.replace(self._t)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_DEAD, dead)
                removed = _delete_counted(conn, t, [row[0] for row, _error in bad])
                t.dead_letters += len(dead)
                t.damaged += len(removed)
                took = _commit_timed(conn)
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            # Skipped this time all the same; the next read meets them again.
            log.error("spool_quarantine_failed", path=str(self.path), error=str(exc))
            return
        self._t = t
        log.error(
            "spool_rows_damaged",
            path=str(self.path),
            seqs=[row[0] for row, _error in bad][:20],
            count=len(bad),
            error=bad[0][1],
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


def _event_row(e: Event) -> _EventRow:
    """An event's row for the events table: its fields as they are, and its size.

    This runs on the event loop for every admitted event, so it is kept to attribute reads. The
    size, which `queue.max_disk_bytes` bounds, is the number of characters of the text fields:
    a cheap estimate of the bytes stored, not their exact UTF-8 length (text beyond ASCII takes
    2-4 bytes a character on disk, and SQLite adds its own overhead), which a coarse disk bound
    does not need. Text SQLite cannot store (a lone surrogate) is not looked for here: the insert
    fails, and only then is the culprit sought (`_unstorable`).
    """
    account, event_id, recipient_id, name = e.account, e.event_id, e.recipient_id, e.name
    value, data, ref = e.value, e.data, e.ref
    size = (
        len(account) + len(event_id) + len(recipient_id) + len(name) + len(value) + len(data)
        + len(ref)
    )  # fmt: skip
    # An int, not the bool: sqlite3 binds exact ints directly, but tries its adapters on a bool
    # (two failed attribute lookups), which made up a fifth of the insert's cost.
    conversion = 1 if e.conversion else 0
    return (
        account, event_id, recipient_id, name, value, conversion, data, ref, e.accepted_at, size
    )  # fmt: skip


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable(row: _EventRow) -> bool:
    """Whether SQLite can store every text of `row` (no lone surrogates)."""
    return all(_is_utf8(value) for value in row if isinstance(value, str))


def _unstorable(op: _Op) -> str | None:
    """Why `op` holds text SQLite cannot store (a lone surrogate), or None if it holds none."""
    for row in op.rows:
        if not _storable(row):
            return f"event {row[1]!r} holds text that is not valid Unicode (a lone surrogate)"
    if op.dead is not None and not all(
        _is_utf8(value) for value in op.dead if isinstance(value, str)
    ):
        return f"dead letter of {op.dead[0]!r} holds text that is not valid Unicode"
    return None


# The text columns of _SELECT_EVENTS, by index, for the messages about a damaged row.
_TEXT_COLUMNS = (
    (1, "account"),
    (2, "event_id"),
    (3, "recipient_id"),
    (4, "name"),
    (5, "value"),
    (7, "data"),
    (8, "ref"),
)


def _event_from_columns(row: Sequence[Any]) -> Event:
    """The event in a row of _SELECT_EVENTS; ValueError says why the row is not one.

    SQLite's column types are only affinities (a BLOB stays a BLOB in a TEXT column), so the
    types are checked, as JSON's were before; this is on the read path, not admission's.
    """
    _seq, account, event_id, recipient_id, name, value, conversion, data, ref, accepted_at = row
    if not (
        type(account) is str
        and type(event_id) is str
        and type(recipient_id) is str
        and type(name) is str
        and type(value) is str
        and type(data) is str
        and type(ref) is str
    ):
        wrong = [n for i, n in _TEXT_COLUMNS if type(row[i]) is not str]
        raise ValueError(f"not an event: {', '.join(wrong)} not text")
    if not event_id or not recipient_id or not name:
        raise ValueError("not an event: empty event_id, recipient_id or name")
    if conversion not in (0, 1) or type(conversion) is not int:
        raise ValueError(f"not an event: conversion is {conversion!r}, not 0 or 1")
    if type(accepted_at) is not float and type(accepted_at) is not int:
        raise ValueError(f"not an event: accepted_at is {accepted_at!r}, not a number")
    return Event(
        event_id=event_id,
        recipient_id=recipient_id,
        # Shared copies: a window of 100 000 reloaded events holds a handful of distinct ones.
        name=shared_name(name),
        value=value,
        conversion=conversion == 1,
        data=data,
        ref=ref,
        accepted_at=float(accepted_at),
        account=shared_name(account),
    )


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float):
        return value
    return repr(value)  # a BLOB


def _damaged_row(row: Sequence[Any], error: str, now: float) -> _DeadRow:
    """A dead letter (reason "damaged") for a row of _SELECT_EVENTS that is not an event.

    Its body keeps the columns as they were, wrapped so that it never reads as an event record:
    a replay must not send something rebuilt from a damaged row.
    """
    columns = dict(zip(_SELECT_COLUMN_NAMES, (_jsonable(value) for value in row), strict=True))
    event_id = row[2] if type(row[2]) is str else None
    account = row[1] if type(row[1]) is str else ""
    body = _ENCODE({"damaged_spool_row": columns})
    return (
        event_id,
        account,
        "damaged",
        None,
        f"spool row {row[0]}: {error}",
        0,
        0.0,
        0.0,
        now,
        body,
    )


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
    if version not in _EVENTS_COLUMNS or not {"events", "dead_letters"} <= tables:
        return f"damaged: schema version {version}, tables {sorted(tables)}"
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(events)")}
    if missing := _EVENTS_COLUMNS[version] - columns:
        # Caught here, so the file is moved aside instead of failing every write (or upgrade).
        return f"damaged: schema version {version}, events lack {', '.join(sorted(missing))}"
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


def _upgrade_from_1(conn: sqlite3.Connection) -> tuple[int, int]:
    """Schema 1 (a JSON body per event) to typed columns; returns (events moved, damaged)."""
    conn.execute("ALTER TABLE events RENAME TO events_v1")
    conn.execute(_CREATE_EVENTS)
    moved = damaged = 0
    now = time.time()
    # A pending SELECT may go on while the same connection writes to another table.
    reader = conn.execute("SELECT seq, account, body FROM events_v1 ORDER BY seq")
    while chunk := reader.fetchmany(CHUNK_ROWS):
        good: list[tuple[Any, ...]] = []
        bad: list[tuple[Any, ...]] = []
        for seq, account, body in chunk:
            try:
                row = _event_row(_decode(body))
                # Checked row by row here (a rare path): one such row must not fail the upgrade.
                if not _storable(row):
                    raise ValueError("text that is not valid Unicode (a lone surrogate)")
            except ValueError as exc:
                error = f"spool row {seq}: {exc} (found upgrading schema 1)"
                bad.append(
                    (_event_id_of(body), account, "damaged", None, error, 0, 0.0, 0.0, now, body)
                )
                continue
            good.append((seq, *row))
        conn.executemany(_INSERT_EVENT_AT, good)
        conn.executemany(_INSERT_DEAD, bad)
        moved += len(good)
        damaged += len(bad)
    # AUTOINCREMENT's record moved with the renamed table: carry it over, so no seq is reused.
    record = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events_v1'").fetchone()
    top = max(
        record[0] if record else 0,
        conn.execute("SELECT max(seq) FROM events_v1").fetchone()[0] or 0,
    )
    conn.execute("DROP TABLE events_v1")  # every row of it is in events or dead_letters now
    if top:
        updated = conn.execute(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'events'", (top,)
        ).rowcount
        if not updated:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (top,))
    return moved, damaged


# How to upgrade each older schema version to SCHEMA_VERSION.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], tuple[int, int]]] = {1: _upgrade_from_1}
# The columns of the events table in each schema version this one can use.
_EVENTS_COLUMNS = {
    1: frozenset({"seq", "account", "body"}),
    SCHEMA_VERSION: frozenset({"seq", *_SELECT_COLUMN_NAMES, "size"}),
}


def _load_totals(conn: sqlite3.Connection) -> _Totals:
    t = _Totals()
    conn.execute("BEGIN")
    try:
        count, size, _lo, _hi = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(seq), max(seq) FROM events"
        ).fetchone()
        t.depth = count
        t.bytes = size
        t.max_seq = _highest_seq(conn)
        _load_oldest(conn, t)
        t.dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    return t


def _highest_seq(conn: sqlite3.Connection) -> int:
    """The highest seq ever given out: AUTOINCREMENT's record, or a row above it."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    top = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    return max(row[0] if row else 0, top or 0)


def _load_oldest(conn: sqlite3.Connection, t: _Totals) -> None:
    row = conn.execute("SELECT seq, accepted_at FROM events ORDER BY seq LIMIT 1").fetchone()
    t.min_seq, t.oldest_accepted_at = (row[0], row[1]) if row else (None, None)


def _insert_events(conn: sqlite3.Connection, rows: Sequence[_EventRow]) -> None:
    """Insert `rows` in order (their seqs are consecutive), in multi-row statements."""
    done, total = 0, len(rows)
    while done < total:
        count = min(_ROWS_PER_INSERT, 1 << ((total - done).bit_length() - 1))
        conn.execute(_INSERT_EVENTS[count], list(chain.from_iterable(rows[done : done + count])))
        done += count


def _delete_events(conn: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, int]:
    """Delete the rows of `seqs` that exist; returns their sizes by seq."""
    found: dict[int, int] = {}
    for chunk in _chunks(seqs, _IN_CHUNK):
        marks = ",".join("?" * len(chunk))
        found.update(
            conn.execute(f"SELECT seq, size FROM events WHERE seq IN ({marks})", chunk).fetchall()
        )
    if found:
        conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in found])
    return found


def _delete_counted(conn: sqlite3.Connection, t: _Totals, seqs: Sequence[int]) -> dict[int, int]:
    """Delete the rows of `seqs` and take them out of the totals (the oldest too, if it went)."""
    removed = _delete_events(conn, seqs) if seqs else {}
    t.depth -= len(removed)
    t.bytes -= sum(removed.values())
    if t.min_seq is None or t.min_seq in removed:
        _load_oldest(conn, t)
    return removed


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
        events: list[_EventRow] = []
        ids: list[tuple[int]] = []
        for id_, body in rows:
            try:
                # Checked here, not left to the insert: one bad body must not stop a replay.
                row = _event_row(_decode(body))
            except ValueError:
                continue
            if not _storable(row):
                continue
            events.append(row)
            ids.append((id_,))
        if events:
            _insert_events(conn, events)
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
    """Every event in the spool, oldest first; ValueError if a row is not a valid event.

    For inspection and tests: it reads all of them into memory, and leaves damaged rows where
    they are (the daemon's read moves them to the dead letters).
    """
    events: list[Event] = []
    for row in conn.execute(_SELECT_EVENTS + " ORDER BY seq"):
        try:
            events.append(_event_from_columns(row))
        except ValueError as exc:
            raise ValueError(f"spool row {row[0]}: {exc}") from None
    return events


def spool_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """What the spool holds: events, bytes, oldest, max seq, dead letters by reason, file sizes.

    "bytes" is the sum of the events' sizes: characters of their text fields, the estimate that
    `queue.max_disk_bytes` bounds (see `_event_row`); "file_bytes" is what the files take.
    """
    path = Path(next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"))
    conn.execute("BEGIN")  # one snapshot for every count
    try:
        count, size, low = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), min(seq) FROM events"
        ).fetchone()
        oldest = None
        if low is not None:
            oldest = conn.execute(
                "SELECT accepted_at FROM events WHERE seq = ?", (low,)
            ).fetchone()[0]
        max_seq = _highest_seq(conn)
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
        "events": count,
        "bytes": size,
        "oldest_accepted_at": oldest,
        "max_seq": max_seq,
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
