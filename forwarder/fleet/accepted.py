"""The numbers this host answered in a fleet's shared queue, kept across its restarts.

An app of the drop-in endpoint keeps the number forwarder answered (`data`), and only the host
that answered it can map it to the event (numbers are each host's; the event may be delivered by
another, its outcome is in Redis under its event_id: outcomes.py). The status book remembers the
last `state.outcome_max_count` events accepted here; this module saves that map to
`state.dir/fleet-accepted.json` every `SAVE_EVERY_S` while it changes and at a clean stop
(fsynced, renamed over the old file, mode 0600), and reads it back at start, without what is
older than `state.outcome_retention_s`. A crash loses the last `SAVE_EVERY_S` of it at most:
those events are still found by their event_id. No secret is in it: event ids, numbers,
account names and times.

A local file, not Redis: the map is this host's alone, and writing it in Redis would cost every
append a second write.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import structlog

from forwarder.ops.statedir import read_state_file, replace_state_file
from forwarder.storage.eventstatus import StatusBook

log = structlog.get_logger("forwarder.fleet")

FILE_NAME = "fleet-accepted.json"
SAVE_EVERY_S = 10.0
# A saved map is at most `state.outcome_max_count` rows of about 80 bytes; this bounds a read.
MAX_FILE_BYTES = 1 << 30
Row = tuple[str, int, str, float]


def load(path: Path) -> list[Row]:
    """The rows saved at `path` ([] if none); a damaged file is logged and ignored."""
    try:
        raw = read_state_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("fleet_accepted_unreadable", path=str(path), error=str(exc))
        return []
    try:
        rows = [(str(e), int(n), str(a), float(t)) for e, n, a, t in orjson.loads(raw)]
    except (orjson.JSONDecodeError, TypeError, ValueError):
        log.warning(
            "fleet_accepted_unreadable",
            path=str(path),
            error="not the saved map",
            action="numbers answered before the restart are found by event_id only",
        )
        return []
    return rows


def save(path: Path, rows: list[Row]) -> None:
    """Write `rows` as `path` durably (a fresh file, fsynced, renamed over the old one)."""
    replace_state_file(path, orjson.dumps(rows))


class AcceptedSaver:
    """Saves the status book's accepted map while it changes, and once more at `stop`."""

    def __init__(self, status: StatusBook, path: Path, every_s: float = SAVE_EVERY_S) -> None:
        self._status = status
        self.path = path
        self._every_s = every_s
        self._saved = status.accepted_changes
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic save (a kept task)."""
        self._task = asyncio.create_task(self._loop(), name="fleet-accepted-save")

    async def stop(self) -> None:
        """Stop the periodic save and save what changed since the last one."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.save_if_changed()

    async def save_if_changed(self) -> None:
        """Save the map if it changed since the last save (off the event loop)."""
        changes = self._status.accepted_changes
        if changes == self._saved:
            return
        try:
            await asyncio.to_thread(save, self.path, self._status.accepted_rows())
        except OSError as exc:  # a full or failing disk: said, tried again at the next round
            log.warning("fleet_accepted_save_failed", path=str(self.path), error=str(exc))
            return
        self._saved = changes

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.save_if_changed()
