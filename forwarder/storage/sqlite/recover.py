"""What SQLite can still read of a damaged spool file, brought into the live spool.

A spool found damaged at start is replaced, before the daemon serves anything (`Spool.open`),
by a fresh one holding what can still be read of it, in order (`swap.recover_aside`: built
beside it, then swapped in, so a crash on the way never leaves the events behind); the damaged
file is moved aside (`opening.move_aside`), and the daemon logs what was brought over and what
could not be read. `forwarder spool inspect FILE` shows the same for any
moved-aside file without changing it, and `forwarder spool recover FILE` brings one into the
spool of a stopped daemon (both in `cli/spool.py`).

How it reads. The file is opened read-only (`immutable=1` when it has no WAL to replay, so
nothing is created beside it) with `PRAGMA writable_schema=ON`: without it SQLite refuses the
whole file when it is shorter than its header says (a cut-off last page); with it, SQLite reads
the pages that are there. Each table is read in key order; at an error, the reader looks for the
next key it can reach (`key >= ? LIMIT 1` probes, galloping then bisecting, so a gap costs a
hundred probes at most whatever the keys) and goes on from there, noting the range it skipped.
A row whose key can be read but whose body cannot (a lost overflow page) is read again without
its body. `.recover` of the sqlite3 shell would also find rows on orphaned pages, but it is not
part of the library Python links; this reads every row a query can still reach.

What becomes of each row: a readable row goes into the live spool as it was (its bytes, its
already-settled events marked settled), so a row that is not a valid row of events goes to the
dead letters by the daemon's usual read path (reason `damaged`); a row whose body is unreadable
becomes a `damaged` dead letter at once; dead letters are copied. Rows that cannot be reached at
all are counted: at most the row numbers in the skipped ranges, up to the highest the file gave
out.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forwarder.storage.sqlite.codec import damaged_row, row_entries
from forwarder.storage.sqlite.file import (
    APPLICATION_ID,
    DEAD_COLUMNS,
    INSERT_DEAD,
    ROW_BITS,
    ROW_EVENTS,
    SCHEMA_VERSION,
    BatchRow,
    DeadRow,
)
from forwarder.storage.sqlite.opening import side_file
from forwarder.storage.sqlite.rows import insert_batches, rollback

_MIN_KEY = -(1 << 63)
_MAX_KEY = (1 << 63) - 1
_BATCH_COLUMNS = "seq, count, accepted_at, size, body"
_BATCH_KEY_COLUMNS = "seq, count, accepted_at, size"  # all but the body, for a row without one
_INSERT_ROWS = 64  # rows per insert_batches call
_ERRORS_KEPT = 5


@dataclass(slots=True)
class Recovery:
    """What was read from a damaged spool file, and what could not be."""

    source: str
    problem: str | None = None  # why nothing could be read (not ours, not SQLite, ...)
    rows: int = 0  # readable rows with unsettled events: brought over
    events: int = 0  # their unsettled events (of the rows that decode)
    settled: int = 0  # events of readable rows settled before: not brought over
    undecodable_rows: int = 0  # readable rows that are not rows of events: dead-lettered
    unreadable_bodies: int = 0  # rows whose body could not be read: dead letters at once
    dead_letters: int = 0  # dead letters copied
    # Per table, key ranges that could not be read ([first, last], last None: to the end).
    skipped: dict[str, list[list[int | None]]] = field(default_factory=dict)
    rows_lost_at_most: int = 0  # row numbers of `batches` in its skipped ranges
    dead_letters_lost_at_most: int = 0
    errors: list[str] = field(default_factory=list)  # the first SQLite errors met

    @property
    def complete(self) -> bool:
        """Everything the file held was read (nothing skipped, no problem)."""
        return self.problem is None and not any(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for `--json` and the log line."""
        return {**asdict(self), "complete": self.complete}

    def summary(self) -> str:
        """A few lines for a terminal."""
        if self.problem:
            return f"{self.source}: nothing recovered: {self.problem}"
        lines = [
            f"{self.source}:",
            f"  rows readable:      {self.rows} ({self.events} events not yet delivered,"
            f" {self.settled} settled before)",
            f"  rows not decodable: {self.undecodable_rows} (become dead letters, reason damaged)",
            f"  bodies unreadable:  {self.unreadable_bodies} (dead letters, reason damaged)",
            f"  dead letters:       {self.dead_letters}",
        ]
        if self.complete:
            lines.append("  every row was readable")
        else:
            lines.append(
                f"  not readable:       at most {self.rows_lost_at_most} row(s) of events and"
                f" {self.dead_letters_lost_at_most} dead letter(s); skipped {self.skipped}"
            )
            lines += [f"  error: {error}" for error in self.errors]
        return "\n".join(lines)


@dataclass(slots=True)
class _Table:
    """One table's reading: what it skipped and the errors it met."""

    recovery: Recovery
    name: str
    skipped: list[list[int | None]] = field(default_factory=list)

    def error(self, exc: sqlite3.Error) -> None:
        errors, error = self.recovery.errors, f"{self.name}: {exc}"
        if len(errors) < _ERRORS_KEPT and error not in errors:
            errors.append(error)

    def skip(self, first: int, last: int | None) -> None:
        self.skipped.append([first, last])
        self.recovery.skipped[self.name] = self.skipped


def open_damaged(path: Path) -> sqlite3.Connection:
    """A read-only connection to a damaged spool file that reads whatever pages are there."""
    wal = side_file(path, "-wal")
    has_wal = wal.exists() and wal.stat().st_size > 0
    # Without a WAL to replay, immutable: no lock, no -shm or -wal made beside the file.
    mode = "mode=ro" if has_wal else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True, isolation_level=None)
    try:
        # Reads a file shorter than its header says (SQLite refuses it whole otherwise).
        conn.execute("PRAGMA writable_schema=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _check(conn: sqlite3.Connection) -> str | None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        return f"not a forwarder spool: application_id {app_id:#x}"
    if version != SCHEMA_VERSION:
        return f"schema version {version}: only version {SCHEMA_VERSION} files are recovered"
    return None


def _reachable(conn: sqlite3.Connection, table: str, key: str, start: int) -> tuple[bool, Any]:
    """(True, the first key >= start or None) if SQLite can get there; (False, None) if not."""
    try:
        found = conn.execute(
            f"SELECT {key} FROM {table} WHERE {key} >= ? ORDER BY {key} LIMIT 1", (start,)
        ).fetchone()
    except sqlite3.DatabaseError:
        return False, None
    return True, (None if found is None else found[0])


def _next_reachable(conn: sqlite3.Connection, table: str, key: str, bad: int) -> int | None:
    """The lowest start above `bad` from which the table can be read on, or None.

    Galloping then bisecting: the keys that cannot be reached past `bad` form a range (the keys
    of a lost page), so this costs at most twice 63 probes however large the keys are.
    """
    step = 1
    good = None
    while bad + step <= _MAX_KEY:
        if _reachable(conn, table, key, bad + step)[0]:
            good = bad + step
            break
        step *= 2
    if good is None:
        if bad < _MAX_KEY and _reachable(conn, table, key, _MAX_KEY)[0]:
            good = _MAX_KEY
        else:
            return None
    low = bad + step // 2 if step > 1 else bad
    while good - low > 1:
        mid = (low + good) // 2
        if _reachable(conn, table, key, mid)[0]:
            good = mid
        else:
            low = mid
    return good


def read_table(
    conn: sqlite3.Connection,
    table: _Table,
    key: str,
    columns: str,
    without_body: str | None = None,
) -> Iterator[tuple[tuple[Any, ...], bool]]:
    """Every row SQLite can still read, in key order: (row, True), or (row without its body,
    False) when only `without_body` columns could be read. Skipped ranges go into `table`."""
    select = f"SELECT {columns} FROM {table.name} WHERE {key} >= ? ORDER BY {key}"
    point = f"SELECT {columns} FROM {table.name} WHERE {key} = ?"
    start = _MIN_KEY
    while True:
        try:
            with closing(conn.execute(select, (start,))) as cursor:
                while chunk := cursor.fetchmany(64):
                    for row in chunk:
                        yield tuple(row), True
                        start = row[0] + 1
            return
        except sqlite3.DatabaseError as exc:
            table.error(exc)
        if start > _MAX_KEY:
            return
        ok, found = _reachable(conn, table.name, key, start)
        if ok and found is None:
            return
        if ok:  # its key can be reached: its columns, or what comes after it, cannot
            row, whole = _read_one(conn, table, point, found, without_body, key)
            if row is not None:
                yield row, whole
            start = found + 1
            continue
        good = _next_reachable(conn, table.name, key, start)
        table.skip(start, None if good is None else good - 1)
        if good is None:
            return
        start = good


def _read_one(
    conn: sqlite3.Connection,
    table: _Table,
    point: str,
    found: int,
    without_body: str | None,
    key: str,
) -> tuple[tuple[Any, ...] | None, bool]:
    """Row `found` whole, or without its body, or (None, _) noted as skipped."""
    try:
        row = conn.execute(point, (found,)).fetchone()
        whole = True
    except sqlite3.DatabaseError as exc:
        if without_body is None:
            row, whole = None, False
            table.error(exc)
        else:
            partial = f"SELECT {without_body} FROM {table.name} WHERE {key} = ?"
            try:
                row, whole = conn.execute(partial, (found,)).fetchone(), False
            except sqlite3.DatabaseError as again:
                row, whole = None, False
                table.error(again)
    if row is None:
        table.skip(found, found)
        return None, False
    return tuple(row), whole


def _highest(conn: sqlite3.Connection, table: str, seen: int) -> int:
    """The highest key AUTOINCREMENT gave out in `table`, if the file still says; else `seen`."""
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    except sqlite3.DatabaseError:
        return seen
    return max(seen, row[0]) if row and type(row[0]) is int else seen


def _lost(skipped: list[list[int | None]], highest: int) -> int:
    total = 0
    for first, last in skipped:
        assert first is not None
        top = highest if last is None else min(last, highest)
        total += max(0, top - max(first, 1) + 1)
    return total


# Where the rows go: `rows` gets readable rows with the indexes of their settled events,
# `dead` gets dead-letter rows.
RowSink = Callable[[list[tuple[BatchRow, list[int]]]], None]
DeadSink = Callable[[list[DeadRow]], None]


def salvage(source: Path, rows_to: RowSink, dead_to: DeadSink) -> Recovery:
    """Read what can be read of the spool file `source` into the sinks, in order; the counts."""
    recovery = Recovery(str(source))
    try:
        conn = open_damaged(source)
    except sqlite3.Error as exc:
        recovery.problem = f"cannot open it: {exc}"
        return recovery
    with closing(conn):
        try:
            recovery.problem = _check(conn)
        except sqlite3.Error as exc:
            recovery.problem = f"cannot read its header or schema: {exc}"
        if recovery.problem:
            return recovery
        _salvage(conn, recovery, rows_to, dead_to)
    return recovery


def _salvage(
    conn: sqlite3.Connection, recovery: Recovery, rows_to: RowSink, dead_to: DeadSink
) -> None:
    settled = {row[0] for row, _ in read_table(conn, _Table(recovery, "settled"), "seq", "seq")}
    batches = _Table(recovery, "batches")
    now = time.time()
    pending: list[tuple[BatchRow, list[int]]] = []
    top = 0
    for row, whole in read_table(conn, batches, "seq", _BATCH_COLUMNS, _BATCH_KEY_COLUMNS):
        seq, count = row[0], row[1]
        top = max(top, seq)
        base = seq << ROW_BITS
        limit = min(count, ROW_EVENTS) if type(count) is int else 0
        done = [i for i in range(limit) if base | i in settled]
        if not whole:
            error = f"its body is unreadable in {Path(recovery.source).name}"
            dead_to([damaged_row((seq, count, row[2], None), error, now)])
            recovery.unreadable_bodies += 1
            continue
        try:
            entries = row_entries((seq, count, row[2], row[4]))
        except ValueError:
            recovery.undecodable_rows += 1  # the daemon's read dead-letters it, bytes kept
        else:
            if len(done) == len(entries):
                recovery.settled += len(done)  # a row kept only until its deletion commits
                continue
            recovery.events += len(entries) - len(done)
            recovery.settled += len(done)
        recovery.rows += 1
        pending.append(((count, row[2], row[3], row[4]), done))
        if len(pending) >= _INSERT_ROWS:
            rows_to(pending)
            pending = []
    if pending:
        rows_to(pending)
    recovery.rows_lost_at_most = _lost(batches.skipped, _highest(conn, "batches", top))
    dead = _Table(recovery, "dead_letters")
    top = 0
    letters: list[DeadRow] = []
    for row, _whole in read_table(conn, dead, "id", DEAD_COLUMNS):
        top = max(top, row[0])
        letters.append(row[1:])
        if len(letters) >= _INSERT_ROWS:
            dead_to(letters)
            recovery.dead_letters += len(letters)
            letters = []
    dead_to(letters)
    recovery.dead_letters += len(letters)
    recovery.dead_letters_lost_at_most = _lost(dead.skipped, _highest(conn, "dead_letters", top))


def recover_into(dst: sqlite3.Connection, source: Path) -> Recovery:
    """Bring what can be read of `source` into the spool `dst`, in one transaction.

    Readable rows are appended in their order, as they were (their settled events listed as
    settled); rows with an unreadable body and the file's dead letters become dead letters.
    """

    def rows_to(rows: list[tuple[BatchRow, list[int]]]) -> None:
        first, _last = insert_batches(dst, [row for row, _done in rows])
        marks = [
            ((first + n) << ROW_BITS | index,)
            for n, (_row, done) in enumerate(rows)
            for index in done
        ]
        dst.executemany("INSERT OR IGNORE INTO settled (seq) VALUES (?)", marks)

    def dead_to(dead: list[DeadRow]) -> None:
        dst.executemany(INSERT_DEAD, dead)

    dst.execute("BEGIN IMMEDIATE")
    try:
        recovery = salvage(source, rows_to, dead_to)
        dst.execute("COMMIT")
    except BaseException:
        rollback(dst)
        raise
    return recovery
