"""Event outcomes in the spool (durable mode): the `outcomes` table and the status look-ups.

A delivered or dead-lettered event's outcome is one row, inserted by the transaction that
settles the event (spool.py), so the spool never says "settled" without saying how. Rows older
than `state.outcome_retention_s` are deleted a bounded number at a time. Every function here
runs on the spool's thread with its connection (`Spool.query`).

A queued event's number is its spool position (`seq = row << ROW_BITS | index`,
storage/numbering.py): finding it is one primary-key read however long the backlog. An event_id has
no index in the rows (one would cost every append); looking one up in the rows is a scan of the
backlog's bodies in SQLite (`instr`), the rare path: apps that keep the number need not take it.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from forwarder.storage.sqlite.codec import row_entries
from forwarder.storage.sqlite.file import ROW_BITS

# event_id, number, state, account, attempts, at, remote_id, reason, status, error
OutcomeRow = tuple[str, int | None, str, str, int, float, Any, str, int | None, str]

INSERT_OUTCOME = (
    "INSERT OR REPLACE INTO outcomes (event_id, number, state, account, attempts, at,"
    " remote_id, reason, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT event_id, number, state, account, attempts, at, remote_id, reason, status, error"
    " FROM outcomes"
)
_INDEX_MASK = (1 << ROW_BITS) - 1


def outcome_by_id(conn: sqlite3.Connection, event_id: str) -> OutcomeRow | None:
    """The stored outcome of `event_id`, if any."""
    row = conn.execute(_SELECT + " WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else tuple(row)


def outcome_by_number(conn: sqlite3.Connection, number: int) -> OutcomeRow | None:
    """The stored outcome of the event numbered `number`, if any."""
    row = conn.execute(_SELECT + " WHERE number = ? LIMIT 1", (number,)).fetchone()
    return None if row is None else tuple(row)


def queued_by_number(conn: sqlite3.Connection, number: int) -> str | None:
    """The event_id of the unsettled event at spool position `number`, or None."""
    if number <= 0:
        return None
    row = conn.execute(
        "SELECT seq, count, accepted_at, body FROM batches WHERE seq = ?", (number >> ROW_BITS,)
    ).fetchone()
    if row is None:
        return None
    return _unsettled_id(conn, row, number)


def queued_by_id(conn: sqlite3.Connection, event_id: str) -> int | None:
    """The spool position of the unsettled event `event_id`, or None (a scan of the backlog)."""
    needle = orjson.dumps(event_id)  # as it is written in a row's body, quotes included
    cursor = conn.execute(
        "SELECT seq, count, accepted_at, body FROM batches WHERE instr(body, ?) > 0 ORDER BY seq",
        (needle,),
    )
    for row in cursor:
        try:
            entries = row_entries(row)
        except ValueError:
            continue
        for index, entry in enumerate(entries):
            if type(entry) is list and entry and entry[0] == event_id:
                number = int(row[0]) << ROW_BITS | index
                if _unsettled_id(conn, row, number) is not None:
                    return number
    return None


def _unsettled_id(conn: sqlite3.Connection, row: Any, number: int) -> str | None:
    try:
        entries = row_entries(row)
    except ValueError:
        return None
    index = number & _INDEX_MASK
    if index >= len(entries):
        return None
    entry = entries[index]
    if type(entry) is not list or not entry or type(entry[0]) is not str:
        return None
    settled = "SELECT 1 FROM settled WHERE seq = ?"
    if len(entries) > 1 and conn.execute(settled, (number,)).fetchone():
        return None
    return entry[0]


def purge(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Delete at most `limit` outcomes recorded before `before`; returns how many."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        deleted = conn.execute(
            "DELETE FROM outcomes WHERE rowid IN"
            " (SELECT rowid FROM outcomes WHERE at < ? ORDER BY at LIMIT ?)",
            (before, limit),
        ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(deleted)


def lift_rows(conn: sqlite3.Connection, number: int) -> int:
    """Make every row seq given out from now on hold numbers of at least `number`.

    Returns the highest row seq now given out (AUTOINCREMENT's record).
    """
    row = (number >> ROW_BITS) + 1
    conn.execute("BEGIN IMMEDIATE")
    try:
        updated = conn.execute(
            "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'batches'", (row,)
        ).rowcount
        if not updated:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('batches', ?)", (row,))
        top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'batches'").fetchone()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(top[0])
