"""The spool's thread: the group commit and every other database call, off the event loop.

`SpoolThread` is the half of `Spool` (`spool.py`) that runs on the spool's one thread: it waits
out a group's window, commits the group in one transaction (one fsync), reads and refreshes,
and moves damaged rows to the dead letters. It reports back to the loop side only through
`_post`, which runs the loop side's `_apply`, `_refuse` or `_fail` there, in order. The state
both halves touch is set up by `Spool.__init__`; what is shared with the loop is under `_lock`.

One module although past 400 lines: every method runs on the one thread against its one
connection and the thread's counters (`_t`), which a commit, a refresh and a read's quarantine
each bring up to date the same way.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import structlog

from forwarder.events import Event
from forwarder.storage.sqlite.codec import (
    damaged_event,
    damaged_row,
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
from forwarder.storage.sqlite.outcomes import INSERT_OUTCOME, OutcomeRow
from forwarder.storage.sqlite.recover import Recovery
from forwarder.storage.sqlite.rows import (
    Totals,
    commit_timed,
    drop_row,
    highest_row,
    insert_batches,
    load_oldest,
    load_totals,
    rollback,
    settle,
    settled_between,
)
from forwarder.storage.sqlite.swap import create_fresh, finish_recovery, recover_aside
from forwarder.storage.sqlite.upgrade import (
    upgrade,
)

log = structlog.get_logger("forwarder.spool")


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


class SpoolThread(abc.ABC):
    """The thread side of `Spool` (see the module docstring)."""

    # Set up by `Spool.__init__`.
    path: Path
    recovery: Recovery | None
    group_window_s: float
    _loop: asyncio.AbstractEventLoop
    # Shared with the loop, under _lock.
    _lock: threading.Lock
    _pending: list[_Op]
    _first_at: float
    _scheduled: bool
    _cut: threading.Event
    _idle: threading.Event
    # Thread-only state.
    _conn: sqlite3.Connection | None
    _t: Totals
    _foreign: int
    _foreign_after: int
    _last_commit_at: float

    # -- the loop side, run there through `_post` ---------------------------------------------

    @abc.abstractmethod
    def _apply(self, totals: Totals, results: list[tuple[_Op, Any]], took: float | None) -> None:
        """On the loop, after a commit: publish the counters, then wake the callers."""

    @abc.abstractmethod
    def _refuse(self, refused: list[tuple[_Op, str]]) -> None:
        """On the loop: these requests hold text SQLite cannot store."""

    @abc.abstractmethod
    def _fail(self, ops: list[_Op], exc: BaseException) -> None:
        """On the loop, after a failed commit: nothing of `ops` was stored."""

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
