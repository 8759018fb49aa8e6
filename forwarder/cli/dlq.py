"""`forwarder dlq` and `forwarder spool`: the dead letters and the spool, from the command line.

They open `state.dir/spool.db` directly (SQLite in WAL mode lets them share it with a running
daemon, which picks replayed events up within a second). Output is one line per item, or JSON
lines with `--json` for scripts. Long operations show a progress bar on a terminal only.

The reads and writes of the spool they make are in `forwarder.cli.spooldb`.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from forwarder.cli.spool import add_file_commands
from forwarder.cli.spooldb import (
    database_path,
    get_dead_letter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    spool_stats,
)
from forwarder.config.load import load_config
from forwarder.config.schema import ConfigError
from forwarder.ops.statedir import running_holder
from forwarder.storage.sqlite.codec import DeadLetter
from forwarder.storage.sqlite.file import SPOOL_FILE, SpoolError
from forwarder.storage.sqlite.opening import open_readonly_or_fail

EXIT_FAILURE = 1
EXIT_USAGE = 2
_AGO_RE = re.compile(r"([0-9]+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, now: float | None = None) -> float:
    """A moment as a UNIX time: ISO 8601 (UTC unless it says otherwise) or an age like `7d`."""
    stripped = text.strip()
    if match := _AGO_RE.fullmatch(stripped):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        return (time.time() if now is None else now) - seconds
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 date/time (2026-11-20, 2026-11-20T08:00) "
            "nor an age (30m, 12h, 7d, 2w)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"forwarder: {message}", file=sys.stderr)
    return code


class _NoSpool(Exception):
    """The state directory has no spool: memory mode writes one only when it must."""


@contextmanager
def _spool(args: argparse.Namespace) -> Iterator[sqlite3.Connection]:
    config = load_config(Path(args.config) if args.config else None)
    path = config.state.path / SPOOL_FILE
    if not path.exists() and not path.is_symlink():  # a link is refused by the open, with why
        raise _NoSpool(str(path))
    conn = open_readonly_or_fail(config.state.path)
    try:
        yield conn
    finally:
        conn.close()


def _run(
    args: argparse.Namespace, work: Callable[[sqlite3.Connection], int], *, missing: int = 0
) -> int:
    """`work` on the spool; with no spool file, a line saying so and the exit code `missing`."""
    try:
        with _spool(args) as conn:
            return work(conn)
    except _NoSpool as exc:
        # Not an error: memory mode creates it only when a stop leaves events or an event is
        # dead-lettered.
        print(f"forwarder: no spool at {exc}: no dead letters and no saved events", file=sys.stderr)
        return missing
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_USAGE)
    except SpoolError as exc:
        return _fail(str(exc))
    except sqlite3.Error as exc:
        return _fail(f"spool error: {exc}")


@contextmanager
def _progress(total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr), nothing in scripts; yields `update(done so far)`."""
    if not sys.stderr.isatty() or total < 1:
        yield lambda done: None
        return
    # Imported here: only an interactive run pays for it.
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda done: progress.update(task, completed=done)


def _line(letter: DeadLetter) -> str:
    event = letter.event
    status = "-" if letter.status is None else str(letter.status)
    return (
        f"{letter.id}\t{_iso(letter.dead_lettered_at)}\t{letter.reason}\t{status}\t"
        f"{event.account or '-'}\t{event.event_id}\t{event.recipient_id}\t{event.name}\t"
        f"{letter.error}"
    )


def cmd_list(args: argparse.Namespace) -> int:
    """List dead letters, oldest first."""

    def work(conn: sqlite3.Connection) -> int:
        letters = list_dead_letters(conn, since=args.since, reason=args.reason, limit=args.limit)
        if not args.json:
            print("id\tdead_lettered_at\treason\tstatus\taccount\tevent_id\trecipient\tname\terror")
        for letter in letters:
            print(json.dumps(letter.to_dict(), ensure_ascii=False) if args.json else _line(letter))
        return 0

    return _run(args, work)


def cmd_show(args: argparse.Namespace) -> int:
    """Show one dead letter in full (JSON)."""

    def work(conn: sqlite3.Connection) -> int:
        letter = get_dead_letter(conn, args.id)
        if letter is None:
            return _fail(f"no dead letter with id {args.id}")
        print(json.dumps(letter.to_dict(), ensure_ascii=False, indent=2))
        return 0

    return _run(args, work, missing=EXIT_FAILURE)


def cmd_replay(args: argparse.Namespace) -> int:
    """Put dead letters back into the spool, with their idempotency keys."""
    if not args.all and not args.ids:
        return _fail("dlq replay: name dead-letter ids, or --all", EXIT_USAGE)

    def work(conn: sqlite3.Connection) -> int:
        ids: list[int] | None = None if args.all else list(args.ids)
        total = len(ids) if ids is not None else spool_stats(conn)["dead_letters_total"]
        with _progress(total, "replaying") as update:
            moved = replay_dead_letters(conn, ids, progress=update)
        # Beside a running daemon by design (SQLite orders the writes): its lock is only read.
        state_dir = database_path(conn).parent
        holder = running_holder(state_dir)
        sends = (
            f"the running forwarder (PID {holder}) sends them"
            if holder is not None
            else f"no forwarder runs on {state_dir} now: the next start sends them"
        )
        print(f"replayed {moved} dead letter(s) into the spool; {sends}")
        if ids is not None and moved < len(set(ids)):
            return _fail(f"{len(set(ids)) - moved} id(s) not found (or not a valid event)")
        return 0

    return _run(args, work)


def cmd_purge(args: argparse.Namespace) -> int:
    """Delete dead letters dead-lettered before a date."""

    def work(conn: sqlite3.Connection) -> int:
        total = spool_stats(conn)["dead_letters_total"] if sys.stderr.isatty() else 0
        with _progress(total, "purging") as update:
            removed = purge_dead_letters(conn, args.before, progress=update)
        print(f"purged {removed} dead letter(s) from before {_iso(args.before)}")
        return 0

    return _run(args, work)


def cmd_stats(args: argparse.Namespace) -> int:
    """What the spool holds."""

    def work(conn: sqlite3.Connection) -> int:
        stats = spool_stats(conn)
        if args.json:
            print(json.dumps(stats))
            return 0
        oldest = stats["oldest_accepted_at"]
        age = f" ({time.time() - oldest:.0f} s ago)" if oldest else ""
        print(f"spool:         {stats['path']}")
        print(f"events:        {stats['events']} in {stats['rows']} rows ({stats['bytes']} bytes)")
        print(f"oldest event:  {_iso(oldest)}{age}")
        print(f"dead letters:  {stats['dead_letters_total']}")
        for reason, count in stats["dead_letters"].items():
            print(f"  {reason}: {count}")
        print(f"file size:     {stats['file_bytes']} bytes (WAL {stats['wal_bytes']})")
        return 0

    return _run(args, work)


def add_commands(sub: Any, config_help: str) -> None:
    """Register `dlq` and `spool` on the `forwarder` parser's subcommands."""
    dlq_docs = "Docs: docs/how-to/dead-letters.md"
    spool_docs = "Docs: docs/how-to/dead-letters.md#damaged-spools"
    dlq = sub.add_parser("dlq", help="list, show, replay or purge dead letters", epilog=dlq_docs)
    verbs = dlq.add_subparsers(dest="dlq_command", required=True)

    listing = verbs.add_parser("list", help="list dead letters, oldest first", epilog=dlq_docs)
    listing.add_argument("--since", type=parse_when, help="ISO date/time or age (7d, 12h)")
    listing.add_argument("--reason", help="rejected, gave_up, internal_error or damaged")
    listing.add_argument("--limit", type=int, help="at most this many")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=cmd_list)

    show = verbs.add_parser("show", help="one dead letter in full", epilog=dlq_docs)
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_show)

    replay = verbs.add_parser(
        "replay", help="send dead letters again (same idempotency key)", epilog=dlq_docs
    )
    replay.add_argument("ids", type=int, nargs="*", metavar="ID")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.set_defaults(func=cmd_replay)

    purge = verbs.add_parser(
        "purge", help="delete dead letters from before a date", epilog=dlq_docs
    )
    purge.add_argument("--before", type=parse_when, required=True, help="ISO date/time or age")
    purge.set_defaults(func=cmd_purge)

    spool = sub.add_parser(
        "spool", help="inspect the spool, or recover a damaged one", epilog=spool_docs
    )
    spool_verbs = spool.add_subparsers(dest="spool_command", required=True)
    stats = spool_verbs.add_parser(
        "stats", help="events, bytes, oldest event, dead letters", epilog=spool_docs
    )
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)
    add_file_commands(spool_verbs, config_help)

    for parser in (listing, show, replay, purge, stats):
        parser.add_argument("--config", help=config_help)
