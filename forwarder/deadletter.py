"""The dead-letter file: events the remote refused for good or that ran out of retry time.

Records are JSON lines in `state.dir/dead-letter.jsonl`. Writes are batched and done in a thread,
so the event loop never waits on the disk; `close()` flushes what is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import structlog

from forwarder.events import Event

DEAD_LETTER_FILE = "dead-letter.jsonl"
log = structlog.get_logger("forwarder.deadletter")


def dead_letter_record(
    event: Event,
    *,
    reason: str,
    status: int | None,
    error: str,
    attempts: int,
    first_attempt_at: float,
    last_attempt_at: float,
) -> dict[str, Any]:
    """The record written for one dead-lettered event."""
    return {
        "event": event.to_dict(),
        "reason": reason,
        "status": status,
        "error": error,
        "attempts": attempts,
        "first_attempt_at": first_attempt_at,
        "last_attempt_at": last_attempt_at,
        "dead_lettered_at": time.time(),
    }


class DeadLetterWriter:
    """Appends dead-letter records from a background task; `add` never blocks."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DEAD_LETTER_FILE
        self._buffer: list[str] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dead-letter-writer")

    def add(self, record: dict[str, Any]) -> None:
        """Queue one record for writing."""
        self._buffer.append(json.dumps(record, ensure_ascii=False) + "\n")
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            await asyncio.to_thread(_append, self.path, lines)
        except OSError as exc:
            # Keep the lines for the next flush rather than lose them; say so loudly.
            self._buffer[:0] = lines
            log.error("dead_letter_write_failed", path=str(self.path), error=str(exc))

    async def close(self) -> None:
        """Stop the writer and flush everything still buffered."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._flush()
        if self._buffer:
            # Last resort: the journal keeps them, so they are not lost without a trace.
            log.error(
                "dead_letters_unwritten",
                count=len(self._buffer),
                path=str(self.path),
                records=[json.loads(line) for line in self._buffer],
            )


def _append(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
