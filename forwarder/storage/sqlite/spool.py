"""The spool: the daemon's handle on the SQLite database of accepted events and dead letters.

Every database call runs on one dedicated thread (the event loop never waits on SQLite), and
appends, removals and dead letters that arrive close together share one transaction and one
fsync (group commit). The file itself is `file.py` (schema), `codec.py`, `opening.py` and
`rows.py`; the `forwarder dlq` and `forwarder spool` commands, which run in their own process
and may work on the database while the daemon has it open (WAL lets readers and one writer
coexist), are `cli/dlq.py` (their reads and writes of the spool: `cli/spooldb.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import structlog

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.sqlite.codec import (
    damaged_event,
    damaged_row,
    dead_row,
    encode_rows,
    event_from_entry,
    is_utf8,
    row_entries,
)
from forwarder.storage.sqlite.file import (
    INSERT_BATCHES,
    INSERT_DEAD,
    READ_ROWS,
    ROW_BITS,
    ROWS_PER_INSERT,
    SELECT_BATCHES,
    SIZE_INDEX,
    SPOOL_FILE,
    BatchRow,
    DeadRow,
    SpoolError,
)
from forwarder.storage.sqlite.opening import (
    connect_daemon,
    inspect_file,
    move_aside,
    nonempty,
    refuse_links,
    side_file,
)
from forwarder.storage.sqlite.outcomes import INSERT_OUTCOME, OutcomeRow, lift_rows
from forwarder.storage.sqlite.recover import Recovery, create_fresh, finish_recovery, recover_aside
from forwarder.storage.sqlite.rows import (
    Totals,
    commit_timed,
    drop_row,
    highest_row,
    insert_batches,
    last_seq,
    load_oldest,
    load_totals,
    rollback,
    settle,
    settled_between,
)
from forwarder.storage.sqlite.upgrade import (
    upgrade,
)

log = structlog.get_logger("forwarder.spool")

_T = TypeVar("_T")


class SpoolFull(Exception):
    """Appending these events would take the spool past its `max_bytes`; nothing was stored."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """An event as stored in the spool, with its position (`seq`, never reused)."""

    seq: int
    event: Event


@dataclass(slots=True, eq=False)
class _Op:
    """One caller's request waiting for the next group commit."""

    future: asyncio.Future[Any] | None
    rows: list[BatchRow] = field(default_factory=list)
    removes: list[int] = field(default_factory=list)
    dead: DeadRow | None = None
    # What became of the settled events (durable mode), in the same transaction as the settling.
    outcomes: list[OutcomeRow] = field(default_factory=list)
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
        # For the line a failing disk writes per commit of requests (the daemon shares its own).
        self.throttle = LogThrottle()
        self.moved_aside_reason = None
        # What was recovered from a damaged file moved aside at open (the caller logs it).
        self.recovery: Recovery | None = None
        self.depth = 0
        self.bytes = 0  # the stored rows' sizes: bytes of their encoded events (see encode_rows)
        self.max_seq = 0
        self.oldest_accepted_at = None
        self.dead_letters = 0
        self.damaged = 0  # rows that were no valid event moved to dead_letters since open
        # After refresh() found rows added by another process: all of them have seq > this.
        # Rows of `forwarder dlq replay` may land below seqs this process got since (both write).
        self.added_after = 0
        self.group_window_s = max(0.0, group_window_s)  # a reload may change it
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
        # The loop cuts it sooner when it runs out of requests (see `_watch_idle`).
        self._lock = threading.Lock()
        self._pending: list[_Op] = []
        self._first_at = 0.0  # time.monotonic() of the oldest pending request
        self._scheduled = False  # a group job is submitted that has not taken _pending yet
        self._cut = threading.Event()  # set by close: no more waiting out windows
        self._idle = threading.Event()  # set by the loop: no request came for two turns
        # Loop-only state of `_watch_idle`.
        self._arrived = False  # a request was queued since the last look
        self._quiet_turns = 0
        self._watching = False
        self._group_jobs: set[Future[None]] = set()
        self._close_task: asyncio.Task[None] | None = None
        # Thread-only state: touched by code running on the spool thread and nowhere else.
        self._conn: sqlite3.Connection | None = None
        self._t = Totals()
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
        # The longest a group waits while the loop keeps taking requests; it is cut as soon as
        # the loop runs out of them. Each commit's fsync and GIL hand-overs cost the busy loop
        # more than the wait: against 3 ms, 8 ms raised durable 100-event batches from 0.75x
        # to 0.86x of memory mode (paired slices, 11 of 12 better). Without the early cut it
        # would leave 32 closed-loop single-event clients waiting on an idle loop (0.39x).
        group_window_s: float = 0.008,
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
        spool.added_after = last_seq(totals.max_row)
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
        self._idle.set()
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
        rows = encode_rows(events)
        size = sum(row[SIZE_INDEX] for row in rows)
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

    def remove_soon(self, seqs: list[int], outcome: OutcomeRow | None = None) -> None:
        """Delete delivered events in the next group commit, without waiting for it.

        `outcome`: the delivered event's outcome, stored by the same transaction.
        """
        if not seqs:
            return
        if not self._accepting:
            # The row stays and is delivered again after a restart, under the same event_id.
            log.warning("spool_closed_remove_dropped", seqs=seqs[:20], count=len(seqs))
            return
        self._enqueue(_Op(None, removes=list(seqs), outcomes=[] if outcome is None else [outcome]))

    async def settle_dead(self, seq: int | None, event: Event, note: DeadLetterNote) -> None:
        """Record a dead letter and delete event `seq` (if given) in one transaction."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._enqueue(_dead_op(future, seq, event, note))
        await future

    def dead_letter_soon(
        self,
        seq: int | None,
        event: Event,
        note: DeadLetterNote,
        outcome: OutcomeRow | None = None,
    ) -> None:
        """`settle_dead` in the next group commit, without waiting for it (and `outcome`)."""
        if not self._accepting:
            # The event's row stays, so it is attempted again after a restart: nothing is lost.
            log.warning(
                "spool_closed_dead_letter_dropped",
                seq=seq,
                event_id=event.event_id,
                reason=note.reason,
            )
            return
        op = _dead_op(None, seq, event, note)
        if outcome is not None:
            op.outcomes.append(outcome)
        self._enqueue(op)

    async def query(self, job: Callable[..., _T], *args: Any) -> _T:
        """Run `job(connection, *args)` on the spool's thread (a read, or a short write)."""
        return await self._run(self._query_job, job, *args)

    async def lift_seq(self, number: int) -> None:
        """Every event seq given out from now on is above `number` (storage/numbering.py)."""
        totals = await self._run(self._lift_job, number)
        self._publish(totals)

    def _lift_job(self, number: int) -> Totals:
        top = lift_rows(self._db(), number)
        self._t.max_row = max(self._t.max_row, top)  # no rows of others' below it: none exist
        return dataclasses.replace(self._t)

    def _query_job(self, job: Callable[..., _T], *args: Any) -> _T:
        return job(self._db(), *args)

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
            self.added_after = last_seq(after)
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
        if self._watching:
            self._arrived = True
        else:  # this request starts the watch
            self._watching, self._arrived, self._quiet_turns = True, False, 0
            self._loop.call_soon(self._watch_idle)
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

    def _watch_idle(self) -> None:
        """Once a turn of the loop while requests wait: after two turns without a new one, the
        loop has run out of requests, and the group is cut at once instead of after its window.

        Two turns, not one: a request read in a turn may reach `_enqueue` only after this
        check has run in the same turn.
        """
        if self._arrived:
            self._arrived = False
            self._quiet_turns = 0
        else:
            self._quiet_turns += 1
        if self._quiet_turns < 2:
            self._loop.call_soon(self._watch_idle)
            return
        self._watching = False
        if self._pending:  # not taken by the thread yet (read without the lock: a hint)
            self._idle.set()

    def _apply(
        self,
        totals: Totals,
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
            self.throttle.log(
                log,
                "error",
                "spool_write_failed",
                key="commit",
                path=str(self.path),
                error=str(exc),
                callers=waiting,
            )

    def _publish(self, totals: Totals) -> None:
        self.depth = totals.depth
        self.bytes = totals.bytes
        self.max_seq = last_seq(totals.max_row)
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

    def _open_job(self, state_dir: Path) -> tuple[Path | None, str | None, Totals]:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = self.path
        refuse_links(path)
        finish_recovery(path)
        problem = inspect_file(path)
        if problem is None and not path.exists() and nonempty(side_file(path, "-wal")):
            # A log without its database would be replayed into the new file: keep it apart.
            problem = "a write-ahead log without its database"
        moved = None
        if problem is not None and problem.startswith("damaged"):
            # What SQLite can still read of it becomes the spool; the file itself goes aside.
            moved, self.recovery = recover_aside(path)
        elif problem is not None:
            moved = move_aside(path)
        if not path.exists():
            create_fresh(path)
        conn = connect_daemon(path)
        try:
            damaged = upgrade(conn, path)
            totals = load_totals(conn)
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
        become fewer and larger. The window ends early when the loop runs out of requests
        (`_watch_idle`): then nobody else is coming, and those waiting would wait for nothing.
        Requests that arrive while this group is written wait for the next job, which the
        first of them submitted and which runs right after this one.
        """
        now = time.monotonic()
        if now - self._last_commit_at < self.group_window_s:
            with self._lock:
                delay = self._first_at + self.group_window_s - now
            if delay > 0:
                self._idle.wait(delay)  # set by the loop when it runs out of requests
        with self._lock:
            ops, self._pending = self._pending, []
            self._scheduled = False
            if not self._cut.is_set():
                self._idle.clear()  # it spoke of these requests: the next group waits anew
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

    def _commit(self, ops: list[_Op]) -> tuple[Totals, list[tuple[_Op, Any]], float]:
        conn = self._db()
        t = dataclasses.replace(self._t)
        rows = [row for op in ops for row in op.rows]
        dead = [op.dead for op in ops if op.dead is not None]
        outcomes = [outcome for op in ops for outcome in op.outcomes]
        settles = sorted({seq for op in ops for seq in op.removes})
        first = 0
        seen_up_to = t.max_row
        if rows and not dead and not settles and not outcomes and len(rows) <= ROWS_PER_INSERT:
            # The common group, appends alone: one INSERT is its own transaction (autocommit),
            # one SQLite call instead of three. Every call gives up the GIL and must take it
            # back from the busy event loop, which costs the loop more than the call itself.
            started = time.perf_counter()
            cursor = conn.execute(INSERT_BATCHES[len(rows)], list(chain.from_iterable(rows)))
            took = time.perf_counter() - started
            last = int(cursor.lastrowid or 0)
            first = last - len(rows) + 1
            foreign = self._count_in(conn, t, rows, first, last)
        else:
            first, foreign, took = self._transaction(conn, t, rows, dead, settles, outcomes)
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
        t: Totals,
        rows: list[BatchRow],
        dead: list[DeadRow],
        settles: list[int],
        outcomes: list[OutcomeRow],
    ) -> tuple[int, int, float]:
        """Appends, dead letters and settlements in one transaction; returns (first row,
        rows other processes added, commit time)."""
        first = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            foreign = 0
            if rows:
                # The rows' seqs come from the inserts themselves, with no query around them.
                first, last = insert_batches(conn, rows)
                foreign = self._count_in(conn, t, rows, first, last)
            if dead:
                conn.executemany(INSERT_DEAD, dead)
                t.dead_letters += len(dead)
            settle(conn, t, settles)
            if outcomes:
                conn.executemany(INSERT_OUTCOME, outcomes)
            took = commit_timed(conn)
        except BaseException:
            rollback(conn)
            raise
        return first, foreign, took

    def _count_in(
        self, conn: sqlite3.Connection, t: Totals, rows: list[BatchRow], first: int, last: int
    ) -> int:
        """Count the rows just inserted as `first`..`last` into `t`; returns how many events
        other processes (`forwarder dlq replay`) added below them since we last looked."""
        if last - first + 1 != len(rows):
            raise SpoolError(f"rows {first}..{last} for {len(rows)} rows: not ours")
        foreign = self._catch_up(conn, t, below=first) if first - 1 > t.max_row else 0
        t.depth += sum(row[0] for row in rows)
        t.bytes += sum(row[SIZE_INDEX] for row in rows)
        t.max_row = last
        if t.min_row is None:
            t.min_row, t.oldest_accepted_at = first, rows[0][1]
        return foreign

    @staticmethod
    def _catch_up(conn: sqlite3.Connection, t: Totals, below: int | None = None) -> int:
        """Count into `t` the events another process added since we last looked; returns how many.

        Only rows below `below`, if given (rows from there on are this process's own).
        `t.max_row` becomes the highest row seq given out so far (below `below`).
        """
        known = highest_row(conn) if below is None else below - 1
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
                load_oldest(conn, t)
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
            rollback(conn)
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
        cursor = conn.execute(SELECT_BATCHES + " WHERE seq >= ? ORDER BY seq", (after >> ROW_BITS,))
        try:
            while len(good) < limit and (chunk := cursor.fetchmany(READ_ROWS)):
                settled = settled_between(conn, chunk[0][0], chunk[-1][0])
                for row in chunk:
                    base = row[0] << ROW_BITS
                    try:
                        entries = row_entries(row)
                    except ValueError as exc:
                        bad_rows.append((row, str(exc)))
                        continue
                    for index, entry in enumerate(entries):
                        seq = base | index
                        if seq <= after or seq in settled:
                            continue
                        try:
                            good.append(SpooledEvent(seq, event_from_entry(entry)))
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
        dead = [damaged_row(row, error, now) for row, error in bad_rows]
        dead += [damaged_event(seq, entry, error, now) for seq, entry, error in bad_events]
        t = dataclasses.replace(self._t)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(INSERT_DEAD, dead)
                for row, _error in bad_rows:
                    drop_row(conn, t, row[0])
                settle(conn, t, [seq for seq, _entry, _error in bad_events])
                t.dead_letters += len(dead)
                t.damaged += len(dead)
                took = commit_timed(conn)
            except BaseException:
                rollback(conn)
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


def _unstorable(op: _Op) -> str | None:
    """Why `op` holds text SQLite cannot store (a lone surrogate), or None if it holds none."""
    if op.dead is not None and not all(
        is_utf8(value) for value in op.dead if isinstance(value, str)
    ):
        return f"dead letter of {op.dead[0]!r} holds text that is not valid Unicode"
    for outcome in op.outcomes:
        if not all(is_utf8(value) for value in outcome if isinstance(value, str)):
            return f"outcome of {outcome[0]!r} holds text that is not valid Unicode"
    return None


def _dead_op(
    future: asyncio.Future[None] | None, seq: int | None, event: Event, note: DeadLetterNote
) -> _Op:
    row = dead_row(event, note, time.time())
    return _Op(future, dead=row, removes=[] if seq is None else [seq])
