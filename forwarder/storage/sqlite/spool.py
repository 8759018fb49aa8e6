"""The spool: the daemon's handle on the SQLite database of accepted events and dead letters.

Every database call runs on one dedicated thread (the event loop never waits on SQLite), and
appends, removals and dead letters that arrive close together share one transaction and one
fsync (group commit). This module is the loop's side: the public operations, the queue of
requests and the idle watch that cuts a group short, and what a commit's results do on the
loop; the thread's side (the group commit, reads, damaged rows) is `committer.py`. The file
itself is `file.py` (schema), `codec.py`, `opening.py` and `rows.py`; the `forwarder dlq` and
`forwarder spool` commands, which run in their own process and may work on the database while
the daemon has it open (WAL lets readers and one writer coexist), are `cli/dlq.py` (their reads
and writes of the spool: `cli/spooldb.py`).

One module although past 400 lines: it is one class's loop side, whose operations, request queue
and result handlers share the reserved bytes, the pending requests and the counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.sqlite.codec import (
    dead_row,
    encode_rows,
)
from forwarder.storage.sqlite.committer import SpooledEvent, SpoolThread, _Op
from forwarder.storage.sqlite.file import (
    SIZE_INDEX,
    SPOOL_FILE,
    SpoolError,
)
from forwarder.storage.sqlite.outcomes import OutcomeRow, lift_rows
from forwarder.storage.sqlite.recover import Recovery
from forwarder.storage.sqlite.rows import (
    Totals,
    last_seq,
)

log = structlog.get_logger("forwarder.spool")

_T = TypeVar("_T")


class SpoolFull(Exception):
    """Appending these events would take the spool past its `max_bytes`; nothing was stored."""


class Spool(SpoolThread):
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


def _dead_op(
    future: asyncio.Future[None] | None, seq: int | None, event: Event, note: DeadLetterNote
) -> _Op:
    row = dead_row(event, note, time.time())
    return _Op(future, dead=row, removes=[] if seq is None else [seq])
