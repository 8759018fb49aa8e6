"""The bounded in-memory queue of accepted events, and the pending file that outlives a stop.

The queue is the only buffer between intake and delivery. Admission is all-or-nothing per request,
so a batch is either wholly queued or wholly refused and the app always knows which events it
still holds.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from forwarder.events import Event

PENDING_FILE = "pending.jsonl"
REJECTED_FILE = "pending.rejected.jsonl"


class EventQueue:
    """A FIFO of events bounded by `max_events`, with all-or-nothing admission."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        # Unbounded underneath: the bound is enforced by `offer`, so `restore` may go past it
        # (events saved at the last stop must never be dropped for want of room).
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def __len__(self) -> int:
        return self._queue.qsize()

    @property
    def free(self) -> int:
        """How many more events `offer` would take now."""
        return max(0, self.max_events - self._queue.qsize())

    def offer(self, events: list[Event]) -> bool:
        """Queue all of `events`, or none of them if they do not all fit."""
        if len(events) > self.free:
            return False
        for event in events:
            self._queue.put_nowait(event)
        return True

    def restore(self, events: Iterable[Event]) -> int:
        """Queue events regardless of the bound (pending events from the last stop)."""
        count = 0
        for event in events:
            self._queue.put_nowait(event)
            count += 1
        return count

    async def get(self) -> Event:
        """Wait for the next event."""
        return await self._queue.get()

    def take_all(self) -> list[Event]:
        """Remove and return everything queued, oldest first."""
        events: list[Event] = []
        while True:
            try:
                events.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return events


@dataclass(slots=True)
class PendingLoad:
    """What was read back from the pending file."""

    events: list[Event] = field(default_factory=list)
    damaged_lines: int = 0


def save_pending(state_dir: Path, events: list[Event]) -> Path:
    """Append events to the pending file and fsync it (blocking: run it in a thread).

    Appending, never truncating, means a pending file that was not consumed (say, a failed start)
    is never overwritten.
    """
    path = state_dir / PENDING_FILE
    lines = "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in events)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(state_dir)
    return path


def load_pending(state_dir: Path) -> PendingLoad:
    """Read the pending file (blocking: run it in a thread).

    Damaged lines (say, torn by a full disk) are copied to `pending.rejected.jsonl` and counted,
    so nothing is dropped without a trace. The caller removes the file once the events are queued.
    """
    path = state_dir / PENDING_FILE
    result = PendingLoad()
    if not path.exists():
        return result
    rejected: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                result.events.append(Event.from_dict(json.loads(line)))
            except (ValueError, TypeError, AttributeError):
                rejected.append(line if line.endswith("\n") else line + "\n")
    if rejected:
        result.damaged_lines = len(rejected)
        with (state_dir / REJECTED_FILE).open("a", encoding="utf-8") as handle:
            handle.writelines(rejected)
    return result


def remove_pending(state_dir: Path) -> None:
    """Remove the pending file after its events were queued (blocking)."""
    (state_dir / PENDING_FILE).unlink(missing_ok=True)
    _fsync_dir(state_dir)


def _fsync_dir(path: Path) -> None:
    # Makes the creation or removal of a file in the directory itself durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
