"""The event log seam: what the daemon, intake and the lanes need of storage, and the registry.

Every accepted event goes into an `EventLog` and leaves it settled (delivered or dead-lettered)
or, at a stop, released (what is left, saved where the next start finds it). Which backend is
used is `queue.mode`, looked up in `BACKENDS` (each entry names the module and function that
opens it, imported only when chosen, as uvicorn's protocol registries do):

- `"memory"` (`memory.py`): events wait in memory; SQLite's `spool.db` is opened only when it
  holds something (the last stop's leftovers, dead letters) or a stop or a dead letter must
  write it;
- `"durable"` (`durable.py`): every event is committed to the spool before intake answers, and
  memory holds a window over it.

A shared queue (Redis Streams, issue 17) is one more entry here and one more module beside
these; intake, the dispatcher and the lanes do not change (docs/explanation/architecture.md).

The lanes read the next event of an account, in per-recipient order, from the log's window
(`EventLog.queue`, an `EventQueue`: `get(account)` and `done(event)`), which the log fills; they
settle through `delivered` / `dead_lettered` (the `delivery.outcomes.Outcomes` sink). Neither
wraps the queue: a delivered event costs no more calls than before the seam.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast

from forwarder.config.schema import Config
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.ops.logthrottle import LogThrottle
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import EventQueue

if TYPE_CHECKING:
    from forwarder.fleet.host import FleetHost


class LogError(Exception):
    """The event log cannot be opened (the state directory, the spool file, the numbers)."""


class Stored(NamedTuple):
    """What the log keeps outside the window, for /v1/stats, the gauges and the stop line."""

    events: int  # events stored (the spool's rows' events; 0 with nothing stored)
    bytes: int  # their stored size
    oldest_accepted_at: float | None  # time.time() the oldest stored event was accepted
    dead_letters: int  # dead letters kept
    on_disk_only: int  # stored events not in memory yet
    replayed: int  # events brought from the store into memory since start


@dataclass(frozen=True, slots=True)
class LogDeps:
    """What the daemon hands a backend when it opens the log."""

    queue: EventQueue  # the window the lanes read from (the daemon's, reloads resize it)
    throttle: LogThrottle  # the daemon's one throttle for lines a request can repeat
    on_commit: Callable[[float], None] | None = None  # each commit's duration (a histogram)
    # The process's one Redis client and heartbeat (fleet.redis_url), for a shared queue: it is
    # started before the log and stopped after it.
    fleet: FleetHost | None = None


class EventLog(Protocol):
    """Where accepted events wait until they are settled (see the module docstring)."""

    @property
    def queue(self) -> EventQueue:
        """The window: the lanes take an account's next event with `get` and give it back with
        `done`; at a stop `take_all_spooled` hands back what is left."""
        ...

    @property
    def status(self) -> StatusBook:
        """What became of events (GET /v1/events/{id}); the lanes tell it attempts."""
        ...

    @property
    def numbers(self) -> EventNumbers:
        """The event numbers of this state directory."""
        ...

    @property
    def intake_numbers(self) -> EventNumbers | None:
        """The numbers intake gives events as it parses them; None when `append` numbers them
        itself (the receipt: each event's `number` is its position in the log)."""
        ...

    @property
    def overflow_waits(self) -> bool:
        """Whether events of accounts without a lane past held's bound can wait in the log, out
        of memory (it asks `kept_out`); False: held dead-letters the oldest."""
        ...

    # Accounts whose events must stay out of the window for now (set by held events).
    kept_out: Callable[[str], bool]
    restored: int  # events of the last stop brought back into memory at open

    # -- intake -------------------------------------------------------------------------------

    def try_append(self, events: list[Event]) -> str | None:
        """Take all of `events` or none at once, without awaiting: "" or why not; None when
        the append must be awaited (`append`): intake's memory-mode requests cost no coroutine."""
        ...

    async def append(self, events: list[Event]) -> str:
        """Take all of `events` or none: "" (stored, each event numbered) or why not."""
        ...

    # -- delivery (the lanes' `Outcomes` sink) ------------------------------------------------

    def delivered(self, event: Event, spool_seq: int) -> None:
        """Settle a delivered event: its row goes, its outcome is kept."""
        ...

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        """Settle a failed event: the dead letter is written and its row goes."""
        ...

    def wake(self) -> None:
        """Room was made in the window other than by a settling: look for events to load."""
        ...

    # -- the view -----------------------------------------------------------------------------

    @property
    def on_disk_only(self) -> int:
        """Stored events not in memory yet (part of the backlog)."""
        ...

    def stored(self) -> Stored:
        """What the log stores outside memory, for the view."""
        ...

    def set_group_commit(self, window_s: float) -> None:
        """queue.group_commit_ms changed (reload); a backend that does not group ignores it."""
        ...

    # -- the lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work: filling the window, purging old outcomes."""
        ...

    async def stop(self) -> None:
        """Stop the background work (before the lanes stop and `release`)."""
        ...

    async def release(self, leftovers: list[tuple[Event, int]]) -> int:
        """At a stop: keep what is left (events with their rows, 0: in memory only) for the next
        start; returns how many had to be written. A failure is logged with the events."""
        ...

    async def close(self) -> None:
        """Commit what is queued and close the store (after `release`; safe to call twice)."""
        ...


Opener = Callable[[Config, LogDeps], Awaitable[EventLog]]

# `queue.mode` → "module:function" of the opener; a backend module is imported only when chosen.
BACKENDS: dict[str, str] = {
    "memory": "forwarder.storage.memory:open_log",
    "durable": "forwarder.storage.durable:open_log",
}


def backend(mode: str) -> Opener:
    """The opener registered for `mode` (KeyError: none is)."""
    module, _, name = BACKENDS[mode].partition(":")
    return cast(Opener, getattr(importlib.import_module(module), name))


async def open_event_log(config: Config, deps: LogDeps) -> EventLog:
    """Open the event log `queue.mode` names; raises LogError."""
    return await backend(config.queue.mode)(config, deps)
