"""Redis unreachable in queue.mode "fleet": intake goes on into the local SQLite spool, and the
mover brings those events into Redis once it answers again.

Nothing is refused and nothing is lost: an append Redis does not acknowledge in time is
committed to `state.dir/spool.db` (fsynced, as in durable mode) and answered. While the spool
holds such events every append goes there too, behind them, so a recipient's events reach the
streams in the order they were accepted; the mover appends them to Redis oldest first and
removes their rows, and only when the spool is empty (and no append to it is under way) do
appends go to Redis directly again.

Exactly once at the remote: an append that timed out may still have reached Redis, and a move
that was cut off after Redis took it is moved again; either way the event is in a stream twice
under one event_id, and the remote answers the second delivery with 409 (the idempotency key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from forwarder.events import Event
from forwarder.storage.sqlite.spool import Spool, SpoolFull

log = structlog.get_logger("forwarder.fleet")

# Events moved into Redis per step.
MOVE_BATCH = 500
# Between two tries of a mover that found Redis still unreachable.
RETRY_S = 0.5


class Fallback:
    """The local spool of a fleet member and the mover task (see the module docstring)."""

    def __init__(self, spool: Spool, to_redis: Callable[[list[Event]], Awaitable[None]]) -> None:
        self.spool = spool
        self._to_redis = to_redis
        self._appending = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.active = spool.depth > 0  # a run before left events here: they go first
        self.moved = 0  # events moved into Redis since start
        self.entered = 0  # times intake fell back

    async def append(self, events: list[Event], why: str) -> str:
        """Commit `events` to the spool; "" or why they could not be taken."""
        if not self.active:
            self.active = True
            self.entered += 1
            log.warning("fleet_queue_fallback", reason=why, action="events go to the local spool")
        self._appending += 1
        try:
            await self.spool.append(events)
        except SpoolFull as exc:
            return f"the local spool is full while Redis is unreachable: {exc}"
        except ValueError as exc:
            return str(exc)
        finally:
            self._appending -= 1
            self._wake.set()
        return ""

    def start(self) -> None:
        """Start the mover."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet-mover")
            self._wake.set()

    async def stop(self) -> None:
        """Stop the mover (what is left stays in the spool for the next start)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def move_once(self) -> int:
        """Move the oldest spooled events into Redis; returns how many (0: none left). Raises
        what the append to Redis raises (the rows stay)."""
        rows = await self.spool.read_after(0, MOVE_BATCH)
        if not rows:
            if self._appending == 0 and self.spool.depth == 0 and self.active:
                self.active = False
                log.info("fleet_queue_recovered", moved=self.moved)
            return 0
        await self._to_redis([row.event for row in rows])
        await self.spool.remove([row.seq for row in rows])
        self.moved += len(rows)
        return len(rows)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.active:
                try:
                    if not await self.move_once():
                        break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis still away: the rows stay, try again soon
                    log.debug("fleet_mover_waiting", error=type(exc).__name__)
                    await asyncio.sleep(RETRY_S)
