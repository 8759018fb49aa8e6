"""The memory backend (`queue.mode = "memory"`): events wait in the bounded in-memory queue.

An append is `EventQueue.admit`, at once (intake awaits nothing); intake numbers the events from
the counter as it parses them. Nothing is written while events flow: SQLite's `spool.db` is
opened only when it has something to give or to take:

- at open, if it exists (or an older version's `pending.jsonl` does): what the last stop saved
  is replayed into memory ahead of anything new, and its dead letters stay readable;
- when an event is dead-lettered (the record goes into the spool's `dead_letters`);
- at a stop (`release`) that leaves events undelivered: they are saved for the next start.

So a run that delivers everything and dead-letters nothing leaves no `spool.db` behind. A kill
-9 loses what is in memory; `durable.py` is the backend that does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from forwarder.config.schema import Config
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.storage import spooled
from forwarder.storage.backlog import Backlog
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.log import EventLog, LogDeps, LogError, Stored
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.sqlite.spool import Spool

log = structlog.get_logger("forwarder.daemon")


class MemoryLog:
    """The `EventLog` of memory mode, its spool opened lazily (see the module docstring)."""

    overflow_waits = False  # nowhere to keep held's overflow: it is dead-lettered

    def __init__(
        self,
        config: Config,
        deps: LogDeps,
        numbers: EventNumbers,
        status: StatusBook,
        backlog: Backlog | None = None,
        restored: int = 0,
    ) -> None:
        self._config = config
        self._deps = deps
        self.queue = deps.queue  # every event waits in the queue itself
        self.numbers = numbers
        self.intake_numbers = numbers  # intake numbers each event as it parses it
        self.status = status  # outcomes are kept in memory only
        self._backlog = backlog
        self.restored = restored
        # Admission is the queue's own: no coroutine per request.
        self.try_append: Callable[[list[Event]], str | None] = deps.queue.admit
        self._kept_out: Callable[[str], bool] = _never
        self._group_window_s = config.queue.group_commit_ms / 1000
        self._started = False
        self._closed = False
        # Dead letters that came before the spool was open, and the task opening it.
        self._waiting: list[tuple[Event, int, DeadLetterNote]] = []
        self._opening: asyncio.Task[Backlog | None] | None = None
        self._open_error: LogError | None = None  # why the last open failed

    @property
    def spool(self) -> Spool | None:
        """The spool, once it is open (None before)."""
        return self._backlog.spool if self._backlog is not None else None

    @property
    def kept_out(self) -> Callable[[str], bool]:
        """Accounts whose rows (added by `forwarder dlq replay`) stay on disk for now."""
        return self._kept_out

    @kept_out.setter
    def kept_out(self, value: Callable[[str], bool]) -> None:
        self._kept_out = value
        if self._backlog is not None:
            self._backlog.kept_out = value

    async def append(self, events: list[Event]) -> str:
        """Into the queue, all or none (as `try_append`, which intake calls instead)."""
        return self.queue.admit(events)

    def delivered(self, event: Event, spool_seq: int) -> None:
        """A delivered event: only one read from the spool has a row to remove."""
        if spool_seq and self._backlog is not None:
            self._backlog.delivered(event, spool_seq)

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        """The dead letter goes into the spool, which is opened for it if it is not yet."""
        if self._backlog is not None:
            self._backlog.dead_lettered(event, spool_seq, note)
            return
        self._waiting.append((event, spool_seq, note))
        if self._closed:
            self._journal_waiting(LogError("the event log is closed"))
        elif self._opening is None or self._opening.done():  # done: it failed, try again
            self._opening = asyncio.create_task(self._open_spool(), name="spool-open")

    def wake(self) -> None:
        """Room was made: rows on disk (if any) may be read."""
        if self._backlog is not None:
            self._backlog.wake()

    @property
    def on_disk_only(self) -> int:
        """Rows added while running (`forwarder dlq replay`) not read yet."""
        return self._backlog.on_disk_only if self._backlog is not None else 0

    def stored(self) -> Stored:
        """The spool's counters; all zero while there is none."""
        if self._backlog is None:
            return Stored(0, 0, None, 0, 0, 0)
        return spooled.stored(self._backlog)

    @property
    def group_window_s(self) -> float:
        """queue.group_commit_ms in seconds: the spool's, now or once it is opened."""
        return self._group_window_s

    def set_group_commit(self, window_s: float) -> None:
        """Kept for the spool, now or once it is opened."""
        self._group_window_s = window_s
        if self._backlog is not None:
            self._backlog.spool.group_window_s = window_s

    def start(self) -> None:
        """Purge old outcomes; read rows other processes add to an open spool."""
        self._started = True
        self.status.start()
        if self._backlog is not None:
            self._backlog.start()

    async def stop(self) -> None:
        """Stop the background work."""
        self._started = False
        if self._backlog is not None:
            await self._backlog.stop()
        await self.status.stop()

    async def release(self, leftovers: list[tuple[Event, int]]) -> int:
        """Save the events that are in memory only to the spool, opening it if need be."""
        if not any(not spool_seq for _event, spool_seq in leftovers):
            return 0
        backlog = await self._open()
        if backlog is None:  # the events go into the journal, with why
            spooled.journal_unsaved(
                self._open_error or LogError("the spool could not be opened"),
                [event for event, spool_seq in leftovers if not spool_seq],
            )
            return 0
        return await spooled.save_leftovers(backlog, self.numbers, leftovers)

    async def close(self) -> None:
        """Wait for an open under way; commit what is queued and close the spool."""
        self._closed = True
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)
        if self._backlog is not None:
            await self._backlog.spool.close()

    # -- opening the spool when it is needed ----------------------------------------------------

    async def _open(self) -> Backlog | None:
        if self._backlog is not None:
            return self._backlog
        if self._opening is None or self._opening.done():  # done: it failed, try again
            self._opening = asyncio.create_task(self._open_spool(), name="spool-open")
        return await asyncio.shield(self._opening)

    async def _open_spool(self) -> Backlog | None:
        """Open a fresh spool for dead letters or a stop's save; None (logged) if it cannot."""
        try:
            spool = await spooled.open_spool(self._config, self._deps.on_commit)
        except LogError as exc:
            self._open_error = exc
            self._journal_waiting(exc)
            return None
        spool.group_window_s = self._group_window_s
        try:
            # Rows added while running (`forwarder dlq replay`) numbered above the block.
            await spooled.lift_seq(self._config, spool, self.numbers.ceiling)
        except LogError as exc:
            await spool.close()
            self._open_error = exc
            self._journal_waiting(exc)
            return None
        backlog = self._backlog = _backlog(spool, self._deps)
        backlog.kept_out = self._kept_out
        if self._started:
            backlog.start()
        waiting, self._waiting = self._waiting, []
        for event, spool_seq, note in waiting:
            backlog.dead_lettered(event, spool_seq, note)
        return backlog

    def _journal_waiting(self, exc: BaseException) -> None:
        """The dead letters cannot be written: this line is the last place left for them."""
        waiting, self._waiting = self._waiting, []
        if waiting:
            log.error(
                "dead_letters_unsaved",
                error=str(exc),
                count=len(waiting),
                events=[event.to_dict() for event, _seq, _note in waiting],
                reasons=[note.reason for _event, _seq, note in waiting],
            )


def _backlog(spool: Spool, deps: LogDeps) -> Backlog:
    backlog = Backlog(deps.queue, spool)
    backlog.throttle = spool.throttle = deps.throttle
    return backlog


def _never(account: str) -> bool:
    return False


async def open_log(config: Config, deps: LogDeps) -> EventLog:
    """The numbers and outcomes; the spool only if it exists: its events replayed first."""
    status = StatusBook(
        retention_s=config.state.outcome_retention_s, max_count=config.state.outcome_max_count
    )
    status.queue = deps.queue
    exists = await asyncio.to_thread(spooled.has_saved, config.state.path)
    if not exists:
        numbers = await spooled.open_numbers(config, None)
        return MemoryLog(config, deps, numbers, status)
    spool = await spooled.open_spool(config, deps.on_commit)
    try:
        await spooled.import_pending(config, spool)
        numbers = await spooled.open_numbers(config, spool)
        # Rows added while running (`forwarder dlq replay`) are numbered by position, above
        # the counter's block.
        await spooled.lift_seq(config, spool, numbers.ceiling)
        backlog = _backlog(spool, deps)
        # What the last stop saved comes first, ahead of anything new (beyond the bound).
        restored = await backlog.replay_all()
    except BaseException:
        await spool.close()
        raise
    spooled.log_replay(restored, backlog)
    return MemoryLog(config, deps, numbers, status, backlog, restored)
