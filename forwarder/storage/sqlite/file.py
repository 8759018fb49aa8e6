"""The spool's file: its schema, how its rows are encoded, and how it is opened and checked.

`state.dir/spool.db` is one SQLite database in WAL mode with `synchronous=FULL`, so a committed
transaction is on disk when COMMIT returns. Each append is one row of the `batches` table: its
events encoded together (orjson, an array of arrays) in one BLOB. An event's position is
`seq = row << ROW_BITS | index`, so events keep their order and a seq is never reused. A row is
deleted once every event in it is settled (delivered or dead-lettered); until then the settled
ones are listed in the `settled` table. One row per request, not one per event: a batch of 100
costs SQLite one row insert instead of 100 (each about 3 µs of CPU, on the core the event loop
shares), which is what made durable mode cost half of batch intake's throughput. Settling, the
rare side (the remote's rate limit paces it), pays a little more instead. Dead letters keep the
event as a JSON body, one row each.

A file that is not ours (another application_id), is from a newer forwarder, or is damaged is
never deleted: it is moved aside to `spool.db.damaged-<UTC time>` and a fresh one is started.

This module holds what the daemon's handle (`spool.py`), the upgrades of older schemas
(`upgrade.py`) and the command line (`cli/spooldb.py`) share: the schema and its statements, the
row codec, opening and checking the file, and the primitives that count and settle rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any, Final

import orjson

from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.events.model import shared_name

SPOOL_FILE = "spool.db"
PAGE_SIZE = 16384  # for new spool files (see connect_daemon)
APPLICATION_ID = 0x46574452  # "FWDR": PRAGMA application_id, to recognise our own files
# PRAGMA user_version. 1: an event per row as a JSON body; 2: an event per row in typed columns;
# 3: an append per row; 4: and the outcomes of settled events (upgraded at open).
SCHEMA_VERSION = 4
# An event's seq is `row << ROW_BITS | index`: a row holds at most ROW_EVENTS events.
ROW_BITS = 10
ROW_EVENTS = 1 << ROW_BITS
_INDEX_MASK = ROW_EVENTS - 1
# How long a connection waits for another one's write lock (the CLI's, or the daemon's).
BUSY_TIMEOUT_S = 5.0
# Rows per transaction for the CLI's bulk operations: short locks, so the daemon barely waits.
CHUNK_ROWS = 1000

_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside a database in WAL mode
_SIDE_FILES = SIDE_FILES
# Result codes (primary) that mean the bytes are bad, as opposed to locked, missing or I/O.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# Values per `IN (...)` list: below the 999 bound-parameter limit of older SQLite builds.
IN_CHUNK = 500

# Schema 4: what became of settled events, for GET /v1/events/{id} (outcomes.py).
# remote_id has no declared type: the remote's id is kept as it came (an integer, or text).
OUTCOMES_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outcomes (
        event_id TEXT PRIMARY KEY,
        number INTEGER,
        state TEXT NOT NULL,
        account TEXT,
        attempts INTEGER,
        at REAL NOT NULL,
        remote_id,
        reason TEXT,
        status INTEGER,
        error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS outcomes_number ON outcomes (number)",
    "CREATE INDEX IF NOT EXISTS outcomes_at ON outcomes (at)",
)
_CREATE_BATCHES = """CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL
)"""
SCHEMA = (
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
    *OUTCOMES_SCHEMA,
)
_ROW_MARKS = "(?, ?, ?, ?)"
# Rows per INSERT, at most: one multi-row statement for a group of appends instead of one per
# row (each statement's step gives up and takes back the GIL). 64 rows bind 256 values.
ROWS_PER_INSERT = 64
# A statement for each row count up to that (sqlite3 caches the prepared ones it is given).
INSERT_BATCHES = {
    rows: "INSERT INTO batches (count, accepted_at, size, body) VALUES "
    + ", ".join([_ROW_MARKS] * rows)
    for rows in range(1, ROWS_PER_INSERT + 1)
}
# The upgrades keep every event's position: an old seq becomes the seq of a one-event row.
INSERT_BATCH_AT = "INSERT INTO batches (seq, count, accepted_at, size, body) VALUES (?, ?, ?, ?, ?)"
SELECT_BATCHES = "SELECT seq, count, accepted_at, body FROM batches"
# Rows fetched at a time by a read of the window (each holds up to ROW_EVENTS events).
READ_ROWS = 16
INSERT_DEAD = (
    "INSERT INTO dead_letters (event_id, account, reason, status, error, attempts,"
    " first_attempt_at, last_attempt_at, dead_lettered_at, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
DEAD_COLUMNS = (
    "id, event_id, account, reason, status, error, attempts, first_attempt_at,"
    " last_attempt_at, dead_lettered_at, body"
)
# count, accepted_at (of its first event), size (of the body), body
BatchRow = tuple[int, float, int, bytes]
SIZE_INDEX: Final = 2  # the index of size in a BatchRow
DeadRow = tuple[str | None, str, str, int | None, str, int, float, float, float, str]


class SpoolError(Exception):
    """The spool cannot be used (the message says why and where)."""


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
class Totals:
    """The spool's counters as of the last commit; the thread's copy is the authoritative one."""

    depth: int = 0
    bytes: int = 0
    max_row: int = 0  # every row with a seq up to here is counted in depth/bytes
    min_row: int | None = None
    oldest_accepted_at: float | None = None
    dead_letters: int = 0
    damaged: int = 0


# -- encoding ---------------------------------------------------------------------------------


# One encoder for every dead-letter body: json.dumps with options builds a fresh one per call.
encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _body(event: Event) -> str:
    """An event as a dead-letter body (JSON); ValueError if it holds text SQLite cannot store."""
    body = encode_json(event.to_dict())
    try:
        body.encode("utf-8")
    except UnicodeEncodeError:
        # Caught here, at the caller, rather than failing a whole shared transaction later.
        raise ValueError(f"event {event.event_id!r} holds text that is not valid Unicode") from None
    return body


def encode_rows(events: list[Event]) -> list[BatchRow]:
    """Events as rows of the batches table: up to ROW_EVENTS of them to a row, in order.

    This runs on the event loop for every durable admission: one orjson call per row, over
    tuples of attributes. A row's size is its body's length, the bytes `queue.max_disk_bytes`
    bounds. ValueError names an event holding text that is not valid Unicode (a lone surrogate),
    which could not be stored.
    """
    rows: list[BatchRow] = []
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


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_utf8_event(e: Event) -> bool:
    return all(
        is_utf8(text)
        for text in (e.event_id, e.recipient_id, e.name, e.value, e.data, e.ref, e.account)
    )


def row_entries(row: Sequence[Any]) -> list[object]:
    """The entries in a row of SELECT_BATCHES; ValueError says why the row cannot be read.

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


def event_from_entry(entry: object) -> Event:
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


# The order of an entry's fields (see encode_rows), for the messages about a damaged one.
_ENTRY_FIELDS = (
    "event_id", "recipient_id", "name", "value", "conversion", "data", "ref", "accepted_at",
    "account",
)  # fmt: skip
_TEXT_FIELDS = frozenset(_ENTRY_FIELDS) - {"conversion", "accepted_at"}


def jsonable(value: object) -> object:
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return repr(value)


def damaged_row(row: Sequence[Any], error: str, now: float) -> DeadRow:
    """A dead letter (reason "damaged") for a row of SELECT_BATCHES that cannot be read.

    Its body keeps the row as it was, wrapped so that it never reads as an event record: a
    replay must not send something rebuilt from a damaged row.
    """
    columns = dict(zip(("seq", "count", "accepted_at", "body"), map(jsonable, row), strict=True))
    body = encode_json({"damaged_spool_row": columns})
    return (None, "", "damaged", None, f"spool row {row[0]}: {error}", 0, 0.0, 0.0, now, body)


def damaged_event(seq: int, entry: object, error: str, now: float) -> DeadRow:
    """A dead letter (reason "damaged") for an entry of a row that is not an event."""
    event_id = account = None
    if type(entry) is list and len(entry) == len(_ENTRY_FIELDS):
        event_id = entry[0] if type(entry[0]) is str else None
        account = entry[-1] if type(entry[-1]) is str else None
    body = encode_json({"damaged_spool_row": {"seq": seq, "event": entry}})
    error = f"spool event {seq}: {error}"
    return (event_id, account or "", "damaged", None, error, 0, 0.0, 0.0, now, body)


def dead_row(event: Event, note: DeadLetterNote, dead_lettered_at: float) -> DeadRow:
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


def decode_body(body: object) -> Event:
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


def event_id_of(body: object) -> str | None:
    """The event_id of a damaged body, if one can still be read from it."""
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        raw = json.loads(body) if isinstance(body, str) else None
        if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
            return str(raw["event_id"])
    return None


def dead_letter_from_row(row: Sequence[Any]) -> DeadLetter:
    (id_, event_id, account, reason, status, error, attempts, first, last, at, body) = row
    try:
        event = decode_body(body)
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


def side_file(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def refuse_links(path: Path) -> None:
    """SpoolError if the database or its -wal/-shm is a symbolic link (SQLite would follow it)."""
    for suffix in ("", *_SIDE_FILES):
        if (name := side_file(path, suffix)).is_symlink():
            raise SpoolError(f"{name} is a symbolic link (not followed; remove it)")


def nonempty(path: Path) -> bool:
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


def inspect_file(path: Path) -> str | None:
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


def move_aside(path: Path) -> Path:
    """Rename the database and its WAL/SHM files to `<name>.damaged-<UTC time>[-N]`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 0
    while any(side_file(base, s).exists() for s in ("", *_SIDE_FILES)):
        n += 1
        base = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # The database first: a crash in between leaves an orphan WAL, which the next open handles.
    for suffix in ("", *_SIDE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.rename(side_file(path, suffix), side_file(base, suffix))
    fsync_dir(path.parent)
    return base


def connect_daemon(path: Path) -> sqlite3.Connection:
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
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
            fsync_dir(path.parent)
        # SQLite gives -wal/-shm the database's mode; narrow all three in case it was wider.
        for suffix in ("", *_SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(side_file(path, suffix), 0o600)
    except sqlite3.Error as exc:
        conn.close()
        raise SpoolError(f"cannot set up the spool {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


# The columns of schema 2's events table that held an event.
V2_COLUMNS = (
    "seq", "account", "event_id", "recipient_id", "name", "value", "conversion", "data", "ref",
    "accepted_at",
)  # fmt: skip
# The tables of each schema version this one can use, with the columns it needs of them.
_EVENTS_TABLE: dict[int, dict[str, frozenset[str]]] = {
    1: {"events": frozenset({"seq", "account", "body"})},
    2: {"events": frozenset(V2_COLUMNS)},
    3: {
        "batches": frozenset({"seq", "count", "accepted_at", "size", "body"}),
        "settled": frozenset(),
    },
    SCHEMA_VERSION: {
        "batches": frozenset({"seq", "count", "accepted_at", "size", "body"}),
        "settled": frozenset(),
        "outcomes": frozenset(),
    },
}


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


# -- opening for the command line (its own connection, checked first) ------------------------


def open_readonly_or_fail(state_dir: Path, *, quick_check: bool = True) -> sqlite3.Connection:
    """Open an existing spool for the CLI; SpoolError if it is missing, foreign or damaged.

    "Readonly" towards the file's existence: it never creates, repairs or moves anything aside.
    The connection can write (replay, purge), in short transactions that wait up to
    BUSY_TIMEOUT_S for the daemon's lock. Pass `quick_check=False` to skip the full-file check.
    """
    path = state_dir / SPOOL_FILE
    refuse_links(path)
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
