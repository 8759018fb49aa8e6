"""Event numbers: the integer the drop-in endpoint answers, as the remote answers its own id.

A number is unique per `state.dir`, increasing, below 2**53 (JavaScript's safe integers) and
never given out twice, not even after a crash. Memory mode takes them from a counter whose
ceiling is kept in `state.dir/event-numbers`, reserved a block at a time: the hot path only
increments an int, and the file is rewritten (new file, fsync, rename, O_NOFOLLOW) once per
block, ahead of need and off the event loop. A crash loses the rest of the block: the next
start begins at the reserved ceiling. Durable mode's numbers are the events' spool positions
(`seq`, never reused in a spool file), which the daemon lifts above the counter's ceiling at
start, so both kinds share one space; the counter observes them so that the ceiling stays
above every number given out, should the spool file be replaced (moved aside when damaged).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

NUMBERS_FILE = "event-numbers"
# Numbers reserved per write. 2**53 / 2**24: half a billion restarts before the range is spent.
BLOCK = 1 << 24
MAX_NUMBER = (1 << 53) - 1


class NumbersError(Exception):
    """The numbers file cannot be read or written."""


def read_ceiling(state_dir: Path) -> int:
    """The ceiling stored in `state_dir` (0 when there is none); raises NumbersError."""
    path = state_dir / NUMBERS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise NumbersError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not text.isdigit() or int(text) > MAX_NUMBER:
        raise NumbersError(f"{path} does not hold a number below 2**53: {text[:30]!r}")
    return int(text)


def write_ceiling(state_dir: Path, ceiling: int) -> None:
    """Store `ceiling` durably: a new file, fsynced, renamed over the old one, dir fsynced."""
    path = state_dir / NUMBERS_FILE
    temp = state_dir / f".{NUMBERS_FILE}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # a leftover of a crash; O_EXCL below must not meet it
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, f"{ceiling}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise NumbersError(f"cannot write {path}: {exc.strerror}") from None


class EventNumbers:
    """The counter of event numbers; create it with `open` (blocking: call it in a thread)."""

    def __init__(self, state_dir: Path, start: int, ceiling: int) -> None:
        self.state_dir = state_dir
        self.next = start  # the next number `take` gives
        self.ceiling = ceiling  # reserved in the file: every number below it may be in use
        self._extending: asyncio.Future[None] | None = None
        # Writes come from the loop (rarely) and a worker thread: one at a time, never lower.
        self._lock = threading.Lock()
        self._written = ceiling

    @classmethod
    def open(cls, state_dir: Path, *, floor: int = 0) -> EventNumbers:
        """Reserve the first block: numbers from the stored ceiling (or `floor`, if higher)."""
        start = max(read_ceiling(state_dir), floor, 1)
        ceiling = start + BLOCK
        if ceiling > MAX_NUMBER:
            raise NumbersError("event numbers are spent (2**53 reached)")
        write_ceiling(state_dir, ceiling)
        return cls(state_dir, start, ceiling)

    def take(self) -> int:
        """The next number; the next block is reserved in the background from halfway on."""
        number = self.next
        self.next = number + 1
        if self.ceiling - number <= BLOCK // 2:
            self._reserve(number)
        return number

    def observe(self, number: int) -> None:
        """A number given out elsewhere (a spool seq): keep the ceiling above it too."""
        if number >= self.next:
            self.next = number + 1
        if self.ceiling - number <= BLOCK // 2:
            self._reserve(number)

    def _reserve(self, number: int) -> None:
        if number >= self.ceiling:
            # Handed out past the reserved range before the background write was done: write
            # now, on the loop (a fsync); with blocks of 16 million this does not happen.
            self.ceiling = number + BLOCK
            self._write(self.ceiling)
            return
        if self._extending is not None and not self._extending.done():
            return
        target = self.ceiling + BLOCK
        loop = asyncio.get_running_loop()
        self._extending = loop.run_in_executor(None, self._write, target)
        self._extending.add_done_callback(lambda done: self._extended(done, target))

    def _write(self, target: int) -> None:
        with self._lock:
            if target > self._written:
                write_ceiling(self.state_dir, target)
                self._written = target

    def _extended(self, done: asyncio.Future[None], target: int) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # tried again on the next take; a failing disk shows up there too
        self.ceiling = max(self.ceiling, target)

    async def wait(self) -> None:
        """Wait for a background reservation in progress (at a stop, and in tests)."""
        if self._extending is not None:
            await asyncio.shield(self._extending)
