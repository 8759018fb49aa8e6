"""The spool as both of today's backends open and leave it: what `memory` and `durable` share.

Opening: the file (a damaged one moved aside and what can be read recovered, logged), a
`pending.jsonl` of an older version moved in, and the event numbers lifted above its positions.
Leaving: the events that are in memory only saved to it, or to the journal if the disk fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog

from forwarder.config.schema import Config
from forwarder.events import Event
from forwarder.storage.backlog import Backlog
from forwarder.storage.log import LogError, Stored
from forwarder.storage.numbering import EventNumbers, NumbersError
from forwarder.storage.sqlite.file import SPOOL_FILE, SpoolError
from forwarder.storage.sqlite.recover import Recovery
from forwarder.storage.sqlite.spool import Spool
from forwarder.storage.sqlite.upgrade import PENDING_FILE, load_pending, remove_pending

# The daemon's logger: these lines were the daemon's before the seam, and filters name it.
log = structlog.get_logger("forwarder.daemon")


async def open_spool(cfg: Config, on_commit: Callable[[float], None] | None) -> Spool:
    """Open the spool (a damaged one is moved aside and what can be read recovered)."""
    state_dir = cfg.state.path
    try:
        spool = await Spool.open(
            state_dir,
            max_bytes=cfg.queue.max_disk_bytes,
            group_window_s=cfg.queue.group_commit_ms / 1000,
            on_commit=on_commit,
        )
    except (OSError, SpoolError, sqlite3.Error) as exc:
        why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)  # no errno
        raise LogError(f"state.dir {state_dir}: {why}") from None
    if spool.moved_aside is not None:
        log.error(
            "spool_moved_aside",
            path=str(spool.moved_aside),
            reason=spool.moved_aside_reason,
            action="kept for inspection; a fresh spool is used"
            + ("" if spool.recovery is None else ", holding what could be read of it"),
        )
    if spool.recovery is not None:
        _log_recovery(spool.recovery)
    return spool


def has_saved(state_dir: Path) -> bool:
    """Whether the state directory holds a spool or an older version's pending file."""
    # lexists: a link where the spool should be is opened, and refused there with its reason.
    return any(
        (state_dir / name).exists() or (state_dir / name).is_symlink()
        for name in (SPOOL_FILE, PENDING_FILE)
    )


async def import_pending(cfg: Config, spool: Spool) -> None:
    """A `pending.jsonl` from an older version goes into the spool: one replay path."""
    state_dir = cfg.state.path
    try:
        pending = await asyncio.to_thread(load_pending, state_dir)
        if pending.events:
            default = cfg.remote.default_account
            events = [
                e if e.account else dataclasses.replace(e, account=default) for e in pending.events
            ]
            await spool.append(events, force=True)
        if pending.events or pending.damaged_lines:
            log.info(
                "pending_file_imported",
                count=len(pending.events),
                damaged_lines=pending.damaged_lines,
            )
        # Removed only once the spool has them committed.
        await asyncio.to_thread(remove_pending, state_dir)
    except (OSError, sqlite3.Error, SpoolError) as exc:  # the file still holds them
        raise LogError(f"cannot move the pending file into the spool: {exc}") from None


async def open_numbers(cfg: Config, spool: Spool | None) -> EventNumbers:
    """The event numbers, above every number given out before and the spool's positions."""
    state_dir = cfg.state.path
    floor = spool.max_seq + 1 if spool is not None else 0
    try:
        return await asyncio.to_thread(EventNumbers.open, state_dir, floor=floor)
    except NumbersError as exc:
        raise LogError(f"state.dir {state_dir}: event numbers: {exc}") from None


async def lift_seq(cfg: Config, spool: Spool, number: int) -> None:
    """The spool's next positions start at `number` or above (they are event numbers too)."""
    try:
        await spool.lift_seq(number)
    except (sqlite3.Error, SpoolError) as exc:
        raise LogError(f"state.dir {cfg.state.path}: event numbers: {exc}") from None


def stored(backlog: Backlog) -> Stored:
    """What the spool under `backlog` holds, for the view."""
    spool = backlog.spool
    return Stored(
        spool.depth,
        spool.bytes,
        spool.oldest_accepted_at,
        spool.dead_letters,
        backlog.on_disk_only,
        backlog.replayed,
    )


def log_replay(restored: int, backlog: Backlog) -> None:
    """The `spool_replay` line, when the spool held events at start."""
    if restored or backlog.spool.depth:
        log.info("spool_replay", in_memory=restored, on_disk=backlog.on_disk_only)


async def save_leftovers(
    backlog: Backlog, numbers: EventNumbers, leftovers: list[tuple[Event, int]]
) -> int:
    """Spool the events that are in memory only; the journal is the last resort."""
    unsaved = [event for event, spool_seq in leftovers if not spool_seq]
    if not unsaved:
        return 0
    try:
        # Their rows' positions must be numbers never given.
        await numbers.wait()
        await backlog.spool.lift_seq(numbers.next)
        await backlog.save(leftovers)
    except (OSError, sqlite3.Error, SpoolError) as exc:
        journal_unsaved(exc, unsaved)
        return 0
    log.info("pending_saved", count=len(unsaved), path=str(backlog.spool.path))
    return len(unsaved)


def journal_unsaved(exc: BaseException, unsaved: list[Event]) -> None:
    """Disk full or gone: the journal is the last place left, so the events are not lost
    without a trace (they can be re-sent from these lines by hand)."""
    log.error(
        "pending_unsaved",
        error=str(exc),
        count=len(unsaved),
        events=[event.to_dict() for event in unsaved],
    )


def _log_recovery(recovery: Recovery) -> None:
    """One line for what was brought over from a damaged spool; an error if not everything."""
    fields = recovery.to_dict()
    fields["action"] = (
        "readable events are sent first; rows that are no events become dead letters (damaged)"
        if recovery.complete
        else f"the rest is not readable; see: forwarder spool inspect {recovery.source}"
    )
    (log.warning if recovery.complete else log.error)("spool_recovered", **fields)
