"""The spool's file: its schema, its statements and its error.

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

What the daemon's handle (`spool.py`), the upgrades of older schemas (`upgrade.py`) and the
command line (`cli/spooldb.py`) share is in four modules: this one (the schema and its statements),
`codec.py` (the row codec), `opening.py` (opening and checking the file, moving it aside) and
`rows.py` (the primitives that count and settle rows).
"""

from __future__ import annotations

from typing import Final

SPOOL_FILE = "spool.db"
PAGE_SIZE = 16384  # for new spool files (see connect_daemon)
APPLICATION_ID = 0x46574452  # "FWDR": PRAGMA application_id, to recognise our own files
# PRAGMA user_version. 1: an event per row as a JSON body; 2: an event per row in typed columns;
# 3: an append per row; 4: and the outcomes of settled events (upgraded at open).
SCHEMA_VERSION = 4
# An event's seq is `row << ROW_BITS | index`: a row holds at most ROW_EVENTS events.
ROW_BITS = 10
ROW_EVENTS = 1 << ROW_BITS
# How long a connection waits for another one's write lock (the CLI's, or the daemon's).
BUSY_TIMEOUT_S = 5.0
# Rows per transaction for the CLI's bulk operations: short locks, so the daemon barely waits.
CHUNK_ROWS = 1000
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


# The columns of schema 2's events table that held an event.
V2_COLUMNS = (
    "seq", "account", "event_id", "recipient_id", "name", "value", "conversion", "data", "ref",
    "accepted_at",
)  # fmt: skip
