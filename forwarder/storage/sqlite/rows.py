"""The row primitives on an open connection (any thread, one connection each): the counters
(`Totals`) loaded, rows inserted, events settled and rows dropped, and the small transaction
helpers the spool's thread, the upgrades and the command line share.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from forwarder.storage.sqlite.file import (
    INSERT_BATCHES,
    ROW_BITS,
    ROW_EVENTS,
    ROWS_PER_INSERT,
    BatchRow,
)

_INDEX_MASK = ROW_EVENTS - 1


@dataclass(slots=True)
class Totals:
    """The spool's counters as of the last commit; the thread's copy is the authoritative one."""

    depth: int = 0
    bytes: int = 0
    max_row: int = 0  # every row with a seq up to here is counted in depth/bytes
    min_row: int | None = None
    oldest_accepted_at: float | None = None
    dead_letters: int = 0
    damaged: int = 0


def load_totals(conn: sqlite3.Connection) -> Totals:
    conn.execute("BEGIN")  # one snapshot for every count
    try:
        return load_totals_in(conn)
    finally:
        conn.execute("COMMIT")


def load_totals_in(conn: sqlite3.Connection) -> Totals:
    t = Totals()
    count, size = conn.execute(
        "SELECT coalesce(sum(count), 0), coalesce(sum(size), 0) FROM batches"
    ).fetchone()
    t.depth = count - conn.execute("SELECT count(*) FROM settled").fetchone()[0]
    t.bytes = size
    t.max_row = highest_row(conn)
    load_oldest(conn, t)
    t.dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return t


def highest_row(conn: sqlite3.Connection) -> int:
    """The highest row seq ever given out: AUTOINCREMENT's record, or a row above it."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
    top = conn.execute("SELECT max(seq) FROM batches").fetchone()[0]
    return max(row[0] if row else 0, top or 0)


def last_seq(row: int) -> int:
    """The highest event seq row `row` can hold: every seq up to it is in rows up to `row`."""
    return row << ROW_BITS | _INDEX_MASK


def load_oldest(conn: sqlite3.Connection, t: Totals) -> None:
    row = conn.execute("SELECT seq, accepted_at FROM batches ORDER BY seq LIMIT 1").fetchone()
    t.min_row, t.oldest_accepted_at = (row[0], row[1]) if row else (None, None)


def insert_batches(conn: sqlite3.Connection, rows: Sequence[BatchRow]) -> tuple[int, int]:
    """Insert `rows` in order, in multi-row statements; returns the first and last row seq.

    Within a write transaction AUTOINCREMENT numbers them one after another; the statements'
    `lastrowid` say where they landed.
    """
    done, total = 0, len(rows)
    first = last = 0
    while done < total:
        count = min(ROWS_PER_INSERT, total - done)
        cursor = conn.execute(
            INSERT_BATCHES[count], list(chain.from_iterable(rows[done : done + count]))
        )
        last = int(cursor.lastrowid or 0)
        if not done:
            first = last - count + 1
        done += count
    return first, last


def settled_between(conn: sqlite3.Connection, first_row: int, last_row: int) -> set[int]:
    """The settled event seqs of rows `first_row`..`last_row`."""
    return {
        seq
        for (seq,) in conn.execute(
            "SELECT seq FROM settled WHERE seq BETWEEN ? AND ?",
            (first_row << ROW_BITS, last_seq(last_row)),
        )
    }


def settle(conn: sqlite3.Connection, t: Totals, seqs: Sequence[int]) -> None:
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
                drop_row(conn, t, row, counted=True, found=found)
            continue
        # Counted, not listed: a row of 1000 events is settled one event at a time.
        added = conn.executemany("INSERT OR IGNORE INTO settled (seq) VALUES (?)", new).rowcount
        if added <= 0:
            continue
        t.depth -= added
        done = conn.execute(
            "SELECT count(*) FROM settled WHERE seq BETWEEN ? AND ?", (base, last_seq(row))
        ).fetchone()[0]
        if done >= count:
            drop_row(conn, t, row, counted=True, found=found)
    if t.min_row is None:
        load_oldest(conn, t)


def drop_row(
    conn: sqlite3.Connection,
    t: Totals,
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
            "DELETE FROM settled WHERE seq BETWEEN ? AND ?", (row << ROW_BITS, last_seq(row))
        ).rowcount
    conn.execute("DELETE FROM batches WHERE seq = ?", (row,))
    if not counted and type(count) is int:
        t.depth -= max(0, count - settled)
    t.bytes -= size if type(size) is int else 0
    if row == t.min_row:
        load_oldest(conn, t)


def commit_timed(conn: sqlite3.Connection) -> float:
    """COMMIT; returns how long it took (the WAL write and its fsync), for the histogram."""
    started = time.perf_counter()
    conn.execute("COMMIT")
    return time.perf_counter() - started


def chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def fsync_dir(path: Path) -> None:
    # A new or renamed file's directory entry is only durable once the directory is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
