"""`forwarder spool inspect FILE` and `forwarder spool recover FILE`: a damaged spool by hand.

`inspect` shows what can still be read of a spool file (a moved-aside one, usually) and changes
nothing; `recover` brings that into the spool of a stopped daemon, holding the state dir's lock
meanwhile. The reading itself is `storage/sqlite/recover.py`'s, the same the daemon runs at start.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from forwarder.storage.sqlite.codec import event_from_entry, row_entries
from forwarder.storage.sqlite.file import SPOOL_FILE, BatchRow, SpoolError
from forwarder.storage.sqlite.opening import connect_daemon, open_readonly_or_fail, refuse_links
from forwarder.storage.sqlite.recover import recover_into, salvage


def _print_events(rows: list[tuple[BatchRow, list[int]]]) -> None:
    for (count, accepted_at, _size, body), done in rows:
        try:
            entries = row_entries((0, count, accepted_at, body))
        except ValueError as exc:
            print(json.dumps({"undecodable_row": str(exc)}))
            continue
        for index, entry in enumerate(entries):
            if index in done:
                continue
            try:
                print(json.dumps(event_from_entry(entry).to_dict(), ensure_ascii=False))
            except ValueError as exc:
                print(json.dumps({"undecodable_event": str(exc)}))


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show what can be read of a spool file (a moved-aside one); changes nothing."""
    source = Path(args.file)
    if not source.is_file():
        print(f"forwarder: no file {source}", file=sys.stderr)
        return 1
    recovery = salvage(
        source, _print_events if args.events else lambda rows: None, lambda dead: None
    )
    if args.json:
        print(json.dumps(recovery.to_dict()))
    else:
        print(recovery.summary(), file=sys.stderr if args.events else sys.stdout)
    return 1 if recovery.problem else 0


def cmd_recover(args: argparse.Namespace) -> int:
    """Bring what can be read of a spool file into the spool of a stopped daemon."""
    from forwarder.config.load import load_config
    from forwarder.config.schema import ConfigError
    from forwarder.ops.statedir import StateDirError, StateLock, prepare_state_dir

    source = Path(args.file)
    try:
        config = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"forwarder: config error: {exc}", file=sys.stderr)
        return 2
    state_dir = config.state.path
    live = state_dir / SPOOL_FILE
    if not source.is_file():
        print(f"forwarder: no file {source}", file=sys.stderr)
        return 1
    if source.resolve() == live.resolve():
        print(f"forwarder: {source} is the live spool; recover a moved-aside file", file=sys.stderr)
        return 1
    try:
        prepare_state_dir(state_dir)
        refuse_links(live)  # a dangling link would have SQLite create its target
        # Alone on the state dir: a daemon would not count the rows in, nor a second recover.
        lock = StateLock.acquire(state_dir, "forwarder spool recover")
    except (StateDirError, OSError, SpoolError) as exc:
        print(f"forwarder: spool recover refused: {exc}", file=sys.stderr)
        return 1
    try:
        conn = open_readonly_or_fail(state_dir) if live.exists() else connect_daemon(live)
        with closing(conn):
            recovery = recover_into(conn, source)
    except (SpoolError, sqlite3.Error) as exc:
        print(f"forwarder: spool recover failed (nothing was added): {exc}", file=sys.stderr)
        return 1
    finally:
        lock.release()
    print(json.dumps(recovery.to_dict()) if args.json else recovery.summary())
    if not recovery.problem and not args.json:
        print(
            f"recovered into {live}: the next start sends the {recovery.events} event(s)"
            " (same event_id: a repeat within the remote's 24 h is answered 409, created once)"
        )
    return 1 if recovery.problem else 0


def add_file_commands(spool_verbs: Any, config_help: str) -> None:
    """Register `forwarder spool inspect FILE` and `forwarder spool recover FILE`."""
    docs = "Docs: docs/how-to/dead-letters.md#damaged-spools"
    inspect = spool_verbs.add_parser(
        "inspect",
        help="what can still be read of a (moved-aside) spool file; changes nothing",
        epilog=docs,
    )
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="the counts as one JSON object")
    inspect.add_argument(
        "--events", action="store_true", help="print each readable event (JSON lines)"
    )
    inspect.set_defaults(func=cmd_inspect)
    recover = spool_verbs.add_parser(
        "recover",
        help="bring a spool file's readable events into the spool (daemon stopped)",
        epilog=docs,
    )
    recover.add_argument("file", metavar="FILE")
    recover.add_argument("--json", action="store_true")
    recover.add_argument("--config", help=config_help)
    recover.set_defaults(func=cmd_recover)
