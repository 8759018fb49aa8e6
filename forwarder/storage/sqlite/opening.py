"""Opening the spool's file and checking it: the daemon's connection (creating the file and
its schema), the command line's (never creating or repairing), and the checks that tell a
damaged or foreign file, which is moved aside and never deleted.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from forwarder.storage.sqlite.file import (
    APPLICATION_ID,
    BUSY_TIMEOUT_S,
    PAGE_SIZE,
    SCHEMA,
    SCHEMA_VERSION,
    SPOOL_FILE,
    V2_COLUMNS,
    SpoolError,
)
from forwarder.storage.sqlite.rows import fsync_dir, rollback

_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside a database in WAL mode
_SIDE_FILES = SIDE_FILES
# Result codes (primary) that mean the bytes are bad, as opposed to locked, missing or I/O.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

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
