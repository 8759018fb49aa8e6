"""The daemon's event log at start and stop: the spool opened, the backlog over it, the save.

At start: the spool is opened (a damaged one moved aside and what can be read recovered), a
`pending.jsonl` of an older version imported, the event numbers and the outcome book opened, and
the backlog put over the spool (memory mode: what the last stop saved replayed into the queue).
At stop: the events that are in memory only are saved to the spool, or to the journal if the
disk fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import structlog

from forwarder.config.schema import Config
from forwarder.daemon.listeners import StartupError, reason
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.ops.metrics import Metrics
from forwarder.storage.backlog import Backlog
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.numbering import EventNumbers, NumbersError
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.file import SpoolError
from forwarder.storage.sqlite.recover import Recovery
from forwarder.storage.sqlite.spool import Spool
from forwarder.storage.sqlite.upgrade import load_pending, remove_pending

log = structlog.get_logger("forwarder.daemon")


@dataclasses.dataclass
class EventLog:
    """What `open_backlog` sets up over the spool."""

    numbers: EventNumbers
    status: StatusBook
    backlog: Backlog
    restored: int  # events of the last stop replayed into memory (memory mode)


async def open_spool(state_dir: Path, cfg: Config, metrics: Metrics) -> Spool:
    """Open the spool (a damaged one is moved aside and what can be read recovered)."""
    try:
        spool = await Spool.open(
            state_dir,
            max_bytes=cfg.queue.max_disk_bytes,
            group_window_s=cfg.queue.group_commit_ms / 1000,
            on_commit=metrics.spool_commit.observe,
        )
    except (OSError, SpoolError, sqlite3.Error) as exc:
        raise StartupError(f"state.dir {state_dir}: {reason(exc)}") from None
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


async def open_backlog(
    cfg: Config, spool: Spool, queue: EventQueue, throttle: LogThrottle
) -> EventLog:
    """Numbers, outcomes and the backlog over the spool, with the last stop's events replayed."""
    state_dir = cfg.state.path
    durable = cfg.queue.mode == "durable"
    try:
        await _import_pending_file(state_dir, spool, cfg.remote.default_account)
    except (OSError, sqlite3.Error, SpoolError) as exc:  # the file still holds them
        raise StartupError(f"cannot move the pending file into the spool: {exc}") from None
    try:
        # Above every number given out before, and above the spool's positions (15.1).
        numbers = await asyncio.to_thread(EventNumbers.open, state_dir, floor=spool.max_seq + 1)
        # Durable: the spool's positions are the numbers from here on. Memory: rows added
        # while running (`forwarder dlq replay`) are numbered by position, above the
        # counter's block.
        await spool.lift_seq(numbers.next if durable else numbers.ceiling)
    except (NumbersError, sqlite3.Error, SpoolError) as exc:
        raise StartupError(f"state.dir {state_dir}: event numbers: {exc}") from None
    status = StatusBook(
        retention_s=cfg.state.outcome_retention_s,
        max_count=cfg.state.outcome_max_count,
        durable=durable,
    )
    status.queue, status.spool = queue, spool
    backlog = Backlog(
        queue,
        spool,
        durable=durable,
        status=status if durable else None,
        numbers=numbers if durable else None,
    )
    backlog.throttle = spool.throttle = throttle
    restored = 0
    if not durable:
        # What the last stop saved comes first, ahead of anything new (beyond the bound).
        restored = await backlog.replay_all()
    if restored or spool.depth:
        log.info("spool_replay", in_memory=restored, on_disk=backlog.on_disk_only)
    return EventLog(numbers, status, backlog, restored)


async def _import_pending_file(state_dir: Path, spool: Spool, default: str) -> None:
    """A `pending.jsonl` from an older version goes into the spool: one replay path."""
    pending = await asyncio.to_thread(load_pending, state_dir)
    if pending.events:
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


async def save_leftovers(
    backlog: Backlog, numbers: EventNumbers | None, leftovers: list[tuple[Event, int]]
) -> int:
    """Spool the events that are in memory only; the journal is the last resort."""
    unsaved = [event for event, spool_seq in leftovers if not spool_seq]
    if not unsaved:
        return 0
    try:
        if numbers is not None:  # their rows' positions must be numbers never given
            await numbers.wait()
            await backlog.spool.lift_seq(numbers.next)
        await backlog.save(leftovers)
    except (OSError, sqlite3.Error, SpoolError) as exc:
        # Disk full or gone: the journal is the last place left, so the events are not lost
        # without a trace (they can be re-sent from these lines by hand).
        log.error(
            "pending_unsaved",
            error=str(exc),
            count=len(unsaved),
            events=[event.to_dict() for event in unsaved],
        )
        return 0
    log.info("pending_saved", count=len(unsaved), path=str(backlog.spool.path))
    return len(unsaved)


def _log_recovery(recovery: Recovery) -> None:
    """One line for what was brought over from a damaged spool; an error if not everything."""
    fields = recovery.to_dict()
    fields["action"] = (
        "readable events are sent first; rows that are no events become dead letters (damaged)"
        if recovery.complete
        else f"the rest is not readable; see: forwarder spool inspect {recovery.source}"
    )
    (log.warning if recovery.complete else log.error)("spool_recovered", **fields)
