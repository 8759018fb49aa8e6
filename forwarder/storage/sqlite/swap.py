"""A spool built beside the live one and swapped in, crash-safely: a recovered spool in place of
a damaged one (`recover_aside`, what SQLite can still read of it: `recover.py`), and a new
spool set up under another name before it appears (`create_fresh`).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from forwarder.storage.sqlite.file import SpoolError
from forwarder.storage.sqlite.opening import SIDE_FILES, connect_daemon, move_aside, side_file
from forwarder.storage.sqlite.recover import Recovery, recover_into
from forwarder.storage.sqlite.rows import fsync_dir

# -- at start: a damaged spool becomes a recovered one, crash-safely ---------------------------

RECOVERING = ".recovering"  # the suffix of the spool being built from a damaged one


def recover_aside(path: Path) -> tuple[Path, Recovery]:
    """Replace the damaged spool at `path` by what can be read of it; (where it went, counts).

    The readable rows are written into `<path>.recovering` (a spool of its own, committed and
    closed), then the damaged file is moved aside and the new one renamed to `path`. A crash
    before the swap leaves the damaged file in place, and the next start does it all again; a
    crash between the two renames leaves a complete `.recovering` file without a spool, which
    `finish_recovery` puts in place. So the events are never left behind in a moved-aside file.
    If the recovery itself fails, the damaged file is moved aside all the same, and the counts
    say why nothing came back (`forwarder spool recover` can try again later).
    """
    building = side_file(path, RECOVERING)
    _remove_spool(building)
    try:
        conn = connect_daemon(building)
        try:
            recovery = recover_into(conn, path)
        finally:
            conn.close()
    except (sqlite3.Error, OSError, SpoolError) as exc:
        _remove_spool(building)
        moved = move_aside(path)
        return moved, Recovery(str(moved), problem=f"recovery failed: {exc}")
    moved = move_aside(path)
    _rename_spool(building, path)
    recovery.source = str(moved)
    return moved, recovery


CREATING = ".creating"  # the suffix of a new spool being set up


def create_fresh(path: Path) -> None:
    """Create the spool at `path` (none is there) set up under another name, then renamed: a
    `forwarder dlq` reading meanwhile finds no spool or a whole one, never a half-made file
    (memory mode creates it while the daemon runs, for a dead letter)."""
    building = side_file(path, CREATING)
    _remove_spool(building)  # a crash's leftover
    connect_daemon(building).close()
    _rename_spool(building, path)


def finish_recovery(path: Path) -> None:
    """Complete or undo a recovery a crash interrupted (see `recover_aside`)."""
    building = side_file(path, RECOVERING)
    if not any(side_file(building, s).exists() for s in ("", *SIDE_FILES)):
        return
    if path.exists():
        _remove_spool(building)  # cut short before the swap: redone from the damaged file
    else:
        _rename_spool(building, path)  # complete: only its rename was left


def _remove_spool(path: Path) -> None:
    for suffix in ("", *SIDE_FILES):
        side_file(path, suffix).unlink(missing_ok=True)


def _rename_spool(source: Path, target: Path) -> None:
    # The -wal first, the database last: a crash in between leaves no database beside an
    # unrelated log (the log of `source` stays with it until the database follows).
    for suffix in (*SIDE_FILES, ""):
        if side_file(source, suffix).exists():
            os.replace(side_file(source, suffix), side_file(target, suffix))
    fsync_dir(target.parent)
