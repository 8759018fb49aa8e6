"""One throttle for log lines that can repeat once per request (refusals, bad requests, 401s).

A storm of bad or refused requests must not become a storm of log lines. Each line has a key
(its event and, say, the refusal's reason; never anything a client chose, so the keys stay few):

- the first occurrence of a key is logged at once, as it is;
- later ones within `interval_s` of the key's window start are counted, not logged;
- when the window ends, one summary line with the same event and level, the latest occurrence's
  fields, `suppressed` (how many were not logged) and a `summary` text ("refused queue_full: 1999
  more in the last 60 s") is logged, and a new window starts. A `count` field (events in the
  request, say) is summed over the suppressed occurrences. A key with nothing to summarise is
  forgotten, so its next occurrence is logged at once again.

Summaries are written by a timer on the running loop (one for the whole throttle, not one per
key), so the count of a flood that stopped still reaches the log; `flush(force=True)` writes what
is pending at a stop. At most `max_keys` keys are tracked; past them new keys share one overflow
key per event. The clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from structlog.typing import FilteringBoundLogger

OVERFLOW_KEY = "(other)"
# A timer may fire a hair early (the loop clock's resolution): within this it counts as due.
_SLACK_S = 0.005


@dataclass(slots=True)
class _Window:
    logger: FilteringBoundLogger
    level: str
    started: float
    suppressed: int = 0
    count: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


class LogThrottle:
    """The first line of each key at once, then at most one summary line per key and interval."""

    def __init__(
        self,
        *,
        interval_s: float = 60.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # on our clock

    def __len__(self) -> int:
        """How many keys are tracked now."""
        return len(self._windows)

    def log(
        self,
        logger: FilteringBoundLogger,
        level: str,
        event: str,
        key: str = "",
        **fields: Any,
    ) -> bool:
        """Log `event` at `level` (a logger method name) unless its key logged within the window.

        Returns whether the line was written now.
        """
        now = self._clock()
        slot = (event, key)
        window = self._windows.get(slot)
        if window is not None and now - window.started >= self.interval_s - _SLACK_S:
            if window.suppressed:
                self._summarise(event, key, window, now)
            else:
                del self._windows[slot]
                window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                self._forget_idle(now)
            if len(self._windows) >= self.max_keys and key != OVERFLOW_KEY:
                return self.log(logger, level, event, OVERFLOW_KEY, **fields)
            self._windows[slot] = _Window(logger, level, now)
            getattr(logger, level)(event, **fields)
            return True
        window.suppressed += 1
        count = fields.get("count")
        if isinstance(count, int):
            window.count += count
        fields.pop("exc_info", None)  # a summary carries no traceback
        window.fields = fields
        window.logger, window.level = logger, level
        self._schedule(window.started + self.interval_s - now)
        return False

    def flush(self, *, force: bool = False) -> None:
        """Write the summaries of ended windows (all of them with `force`); forget idle keys."""
        self._timer = None
        now = self._clock()
        due_in: float | None = None
        for (event, key), window in list(self._windows.items()):
            left = window.started + self.interval_s - now
            if window.suppressed and (force or left <= _SLACK_S):
                self._summarise(event, key, window, now)
            elif not window.suppressed and left <= _SLACK_S:
                del self._windows[(event, key)]
            elif window.suppressed:
                due_in = left if due_in is None else min(due_in, left)
        if due_in is not None:
            self._schedule(due_in)

    def close(self) -> None:
        """Write every pending summary now and stop the timer (the daemon is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush(force=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _summarise(self, event: str, key: str, window: _Window, now: float) -> None:
        fields = dict(window.fields)
        if "count" in fields:
            fields["count"] = window.count
        name = f"{event} {key}" if key else event
        getattr(window.logger, window.level)(
            event,
            **fields,
            suppressed=window.suppressed,
            summary=f"{name}: {window.suppressed} more in the last {self.interval_s:g} s",
        )
        # The flood may go on: a new window, whose occurrences are summarised in turn.
        window.started, window.suppressed, window.count, window.fields = now, 0, 0, {}

    def _forget_idle(self, now: float) -> None:
        for slot, window in list(self._windows.items()):
            if not window.suppressed and now - window.started >= self.interval_s - _SLACK_S:
                del self._windows[slot]

    def _schedule(self, delay: float) -> None:
        due = self._clock() + delay
        if self._timer is not None:
            if self._timer_at <= due + _SLACK_S:
                return  # the pending timer comes first; its flush schedules the next one
            self._timer.cancel()
            self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test with its own clock): flush() is called by hand
        self._timer = loop.call_later(max(delay, 0.0), self.flush)
        self._timer_at = due
