"""What older versions left behind, brought forward when the daemon opens its spool.

Spools of schema 1 (a JSON body per event) and 2 (typed columns per event) are upgraded in place
to rows per append (schema 3, see `file.py`), in one transaction, every event keeping its
order; a row that cannot be read goes to the dead letters whole. Schema 4 adds the `outcomes`
table (outcomes.py) to a schema 3 file and changes nothing else. Before the spool existed, a
clean stop saved its leftovers to `pending.jsonl`: the daemon moves such a file into the spool
at start, so one replay path serves every version's leftovers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from forwarder.events import Event
from forwarder.ops.statedir import open_state_file
from forwarder.storage.sqlite.codec import (
    decode_body,
    encode_json,
    encode_rows,
    event_from_entry,
    event_id_of,
    jsonable,
)
from forwarder.storage.sqlite.file import (
    CHUNK_ROWS,
    INSERT_BATCH_AT,
    INSERT_DEAD,
    OUTCOMES_SCHEMA,
    SCHEMA,
    SCHEMA_VERSION,
    V2_COLUMNS,
    DeadRow,
)
from forwarder.storage.sqlite.rows import fsync_dir, rollback

log = structlog.get_logger("forwarder.spool")


def upgrade(conn: sqlite3.Connection, path: Path) -> int:
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
        rollback(conn)
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
    damaged: Callable[[Sequence[Any], str, float], DeadRow],
) -> tuple[int, int]:
    """An event-per-row table to the batches table; returns (events moved, damaged).

    Every event keeps its place: old seq N becomes a one-event row N (event seq N << ROW_BITS).
    """
    conn.execute("ALTER TABLE events RENAME TO events_old")
    for statement in SCHEMA:
        conn.execute(statement)
    moved = bad_count = 0
    now = time.time()
    # A pending SELECT may go on while the same connection writes to other tables.
    reader = conn.execute(f"SELECT seq, {columns} FROM events_old ORDER BY seq")
    while chunk := reader.fetchmany(CHUNK_ROWS):
        good: list[tuple[Any, ...]] = []
        bad: list[DeadRow] = []
        for row in chunk:
            try:
                # Checked row by row here (a rare path): one bad row must not fail the upgrade.
                [encoded] = encode_rows([to_event(row)])
            except ValueError as exc:
                bad.append(damaged(row, f"{exc} (found upgrading schema {version})", now))
                continue
            good.append((row[0], *encoded))
        conn.executemany(INSERT_BATCH_AT, good)
        conn.executemany(INSERT_DEAD, bad)
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

    def damaged(row: Sequence[Any], error: str, now: float) -> DeadRow:
        seq, account, body = row
        error = f"spool row {seq}: {error}"
        return (event_id_of(body), account, "damaged", None, error, 0, 0.0, 0.0, now, body)

    return _upgrade_rows(conn, 1, "account, body", lambda row: decode_body(row[2]), damaged)


def _upgrade_from_2(conn: sqlite3.Connection) -> tuple[int, int]:
    """Schema 2 (typed columns, an event per row) to rows of events; returns the same."""

    def to_event(row: Sequence[Any]) -> Event:
        _seq, account, event_id, recipient_id, name, value, conversion, data, ref, at = row
        if type(conversion) is int and conversion in (0, 1):
            conversion = conversion == 1
        return event_from_entry(
            [event_id, recipient_id, name, value, conversion, data, ref, at, account]
        )

    def damaged(row: Sequence[Any], error: str, now: float) -> DeadRow:
        columns = dict(zip(V2_COLUMNS, map(jsonable, row), strict=True))
        body = encode_json({"damaged_spool_row": columns})
        event_id = row[2] if type(row[2]) is str else None
        account = row[1] if type(row[1]) is str else ""
        error = f"spool row {row[0]}: {error}"
        return (event_id, account, "damaged", None, error, 0, 0.0, 0.0, now, body)

    return _upgrade_rows(conn, 2, ", ".join(V2_COLUMNS[1:]), to_event, damaged)


def _upgrade_from_3(conn: sqlite3.Connection) -> tuple[int, int]:
    """Schema 3 to 4: the rows stay as they are; the outcomes table is added."""
    for statement in OUTCOMES_SCHEMA:
        conn.execute(statement)
    return 0, 0


# How to upgrade each older schema version to SCHEMA_VERSION.
_UPGRADES: dict[int, Callable[[sqlite3.Connection], tuple[int, int]]] = {
    1: _upgrade_from_1,
    2: _upgrade_from_2,
    3: _upgrade_from_3,
}


# -- the pending file of older versions -------------------------------------------------------
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
    fd = open_state_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(state_dir)
    return path


def load_pending(state_dir: Path) -> PendingLoad:
    """Read the pending file (blocking: run it in a thread).

    Damaged lines (say, torn by a full disk) are copied to `pending.rejected.jsonl` and counted,
    so nothing is dropped without a trace. The caller removes the file once the events are queued.
    """
    path = state_dir / PENDING_FILE
    result = PendingLoad()
    try:
        fd = open_state_file(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return result
    rejected: list[str] = []
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                result.events.append(Event.from_dict(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                rejected.append(line if line.endswith("\n") else line + "\n")
    if rejected:
        result.damaged_lines = len(rejected)
        fd = open_state_file(state_dir / REJECTED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.writelines(rejected)
    return result


def remove_pending(state_dir: Path) -> None:
    """Remove the pending file after its events were queued (blocking)."""
    (state_dir / PENDING_FILE).unlink(missing_ok=True)
    fsync_dir(state_dir)
