"""The durable backend (`queue.mode = "durable"`): every event committed to the spool first.

An append is a group commit to `state.dir/spool.db` (fsynced) before intake answers; an event's
number is its row's position. Memory holds a window over the spool (`backlog.py`), refilled in
order and shared fairly between accounts; a settling removes the row (with the outcome, kept
for GET /v1/events/{id}) in the next group commit. At a stop nothing is left to write: every
event is on disk already.

A module beside `memory.py` rather than inside `sqlite/`: `sqlite/` is the spool file and its
handle, which both backends use; this is the policy that makes the spool the log.
"""

from __future__ import annotations

from collections.abc import Callable

from forwarder.config.schema import Config
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.storage import spooled
from forwarder.storage.backlog import Backlog
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.log import EventLog, LogDeps, Stored
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.spool import Spool


class DurableLog:
    """The `EventLog` whose every event is in the spool (see the module docstring)."""

    intake_numbers: EventNumbers | None = None  # numbers are spool positions, given by append
    overflow_waits = True  # held's overflow waits in the spool, out of the window
    restored = 0  # nothing is replayed: the window is read from the spool as it drains

    def __init__(
        self, spool: Spool, numbers: EventNumbers, status: StatusBook, backlog: Backlog
    ) -> None:
        self.spool = spool
        self.numbers = numbers  # the counter, kept above every spool position
        self.status = status  # outcomes are kept in the spool too
        self.queue: EventQueue = backlog.queue  # the window over the spool
        self.backlog = backlog
        # The lanes' settling goes straight to the backlog: no call in between on the hot path.
        self.delivered: Callable[[Event, int], None] = backlog.delivered
        self.dead_lettered: Callable[[Event, int, DeadLetterNote], None] = backlog.dead_lettered
        self.append = backlog.admit
        self.wake = backlog.wake

    @property
    def kept_out(self) -> Callable[[str], bool]:
        """Accounts whose rows stay on disk for now (held events without room)."""
        return self.backlog.kept_out

    @kept_out.setter
    def kept_out(self, value: Callable[[str], bool]) -> None:
        self.backlog.kept_out = value

    def try_append(self, events: list[Event]) -> str | None:
        """Never at once: the commit must be awaited (`append`)."""
        return None

    @property
    def on_disk_only(self) -> int:
        """Spooled events not in the window yet."""
        return self.backlog.on_disk_only

    def stored(self) -> Stored:
        """The spool's counters."""
        return spooled.stored(self.backlog)

    def set_group_commit(self, window_s: float) -> None:
        """The longest a group commit waits for more requests."""
        self.spool.group_window_s = window_s

    def start(self) -> None:
        """Start filling the window and purging old outcomes."""
        self.backlog.start()
        self.status.start()

    async def stop(self) -> None:
        """Stop both (events not in the window stay in the spool)."""
        await self.backlog.stop()
        await self.status.stop()

    async def release(self, leftovers: list[tuple[Event, int]]) -> int:
        """Every event has its row already; one without (none expected) is written."""
        return await spooled.save_leftovers(self.backlog, self.numbers, leftovers)

    async def close(self) -> None:
        """Commit what is queued and close the spool."""
        await self.spool.close()


async def open_log(config: Config, deps: LogDeps) -> EventLog:
    """Open the spool (recovering or importing what is there) and put the window over it."""
    spool = await spooled.open_spool(config, deps.on_commit)
    try:
        await spooled.import_pending(config, spool)
        numbers = await spooled.open_numbers(config, spool)
        # The spool's positions are the numbers from here on.
        await spooled.lift_seq(config, spool, numbers.next)
    except BaseException:
        await spool.close()
        raise
    status = StatusBook(
        retention_s=config.state.outcome_retention_s, max_count=config.state.outcome_max_count
    )
    status.queue, status.spool = deps.queue, spool
    backlog = Backlog(deps.queue, spool, status=status, numbers=numbers)
    backlog.throttle = spool.throttle = deps.throttle
    spooled.log_replay(0, backlog)
    return DurableLog(spool, numbers, status, backlog)
