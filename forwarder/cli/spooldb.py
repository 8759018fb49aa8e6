"""The spool as the `dlq` and `spool` commands see it: synchronous, a connection of their own.

Dead letters listed, shown, replayed into the events (same idempotency key) and purged; the
unsettled events read out; what the spool holds counted. Writes go in transactions of a
bounded number of rows (`chunk`), beside a running daemon if there is one (SQLite orders the
writes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from forwarder.events import Event
from forwarder.storage.sqlite.codec import (
    DeadLetter,
    dead_letter_from_row,
    decode_body,
    encode_rows,
    event_from_entry,
    row_entries,
)
from forwarder.storage.sqlite.file import (
    CHUNK_ROWS,
    DEAD_COLUMNS,
    IN_CHUNK,
    ROW_BITS,
    SELECT_BATCHES,
)
from forwarder.storage.sqlite.opening import side_file
from forwarder.storage.sqlite.rows import chunks, insert_batches, last_seq, load_totals_in, rollback


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
    sql = f"SELECT {DEAD_COLUMNS} FROM dead_letters"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [dead_letter_from_row(row) for row in conn.execute(sql, params)]


def get_dead_letter(conn: sqlite3.Connection, id: int) -> DeadLetter | None:
    """One dead letter by id, or None."""
    row = conn.execute(f"SELECT {DEAD_COLUMNS} FROM dead_letters WHERE id = ?", (id,)).fetchone()
    return None if row is None else dead_letter_from_row(row)


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
    for part in chunks(sorted(set(ids)), max(1, min(chunk, IN_CHUNK))):
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
                event = decode_body(body)
                encode_rows([event])
            except ValueError:
                continue
            events.append(event)
            ids.append((id_,))
        if events:
            insert_batches(conn, encode_rows(events))
            conn.executemany("DELETE FROM dead_letters WHERE id = ?", ids)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
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
            rollback(conn)
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
    for row in conn.execute(SELECT_BATCHES + " ORDER BY seq"):
        try:
            entries = row_entries(row)
        except ValueError as exc:
            raise ValueError(f"spool row {row[0]}: {exc}") from None
        for index, entry in enumerate(entries):
            seq = row[0] << ROW_BITS | index
            if seq in settled:
                continue
            try:
                events.append(event_from_entry(entry))
            except ValueError as exc:
                raise ValueError(f"spool event {seq}: {exc}") from None
    return events


def database_path(conn: sqlite3.Connection) -> Path:
    return Path(next(row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"))


def spool_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """What the spool holds: events, bytes, oldest, max seq, dead letters by reason, file sizes.

    "bytes" is the size of the rows that hold unsettled events (their encoded events: what
    `queue.max_disk_bytes` bounds); "file_bytes" is what the files take.
    """
    path = database_path(conn)
    conn.execute("BEGIN")  # one snapshot for every count
    try:
        t = load_totals_in(conn)
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
            files[suffix] = side_file(path, suffix).stat().st_size
        except FileNotFoundError:
            files[suffix] = 0
    return {
        "path": str(path),
        "events": t.depth,
        "rows": rows,
        "bytes": t.bytes,
        "oldest_accepted_at": t.oldest_accepted_at,
        "max_seq": last_seq(t.max_row),
        "schema_version": version,
        "dead_letters": by_reason,
        "dead_letters_total": sum(by_reason.values()),
        "file_bytes": files[""] + files["-wal"],
        "wal_bytes": files["-wal"],
    }
