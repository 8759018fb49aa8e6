"""The remote's rate window's length, learned from `X-RateLimit-Reset`, not from one answer.

An answer's reset is the time left in the remote's current window: right after a window starts
it is the window's length (whole seconds, rounded up), later less. The longest reset seen would
be the window's length, were every answer right; but one outlier (3600 in a one-minute window)
taken as the window once paced delivery sixty times too slowly until a restart. So:

- an answer counts only once another answer of the same window agrees with it on when the
  window ends (`now + reset`, within `AGREE_S`: resets are rounded up, answers take time to
  arrive). A window's evidence is the longest reset among the agreeing answers that say the
  window ends first (a reset is an upper bound: of two claims, the earlier end is the one to
  believe). An outlier agrees with nobody, and outliers that agree are outvoted;
- the length is the highest evidence of the last `KEEP` windows that had any, so an old peak
  decays as new windows are seen;
- it never exceeds `MAX_WINDOW_S`: the remote's window is one minute. A guess too long slows
  delivery; one too short only paces faster within the quota, which the limiter counts anyway;
- until there is evidence (at the start, after `forget` for a reload), a single answer may
  shorten it from `DEFAULT_WINDOW_S`, never lengthen it: that errs on the safe side.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# The remote's window ("N requests per minute"), assumed until answers say otherwise.
DEFAULT_WINDOW_S = 60.0
# The longest window believed for pacing, whatever a reset says.
MAX_WINDOW_S = 60.0
# Resets are whole seconds: no window is taken as shorter.
MIN_WINDOW_S = 1.0
# Two answers agree on a window's end within this: a reset is rounded up to whole seconds, and
# an answer's arrival lags the moment the remote computed it.
AGREE_S = 1.5
# Windows whose evidence counts: an outlier's effect ends after this many windows with answers.
KEEP = 4
# Groups of agreeing answers tracked per window; past it the least supported one is dropped.
MAX_GROUPS = 8


@dataclass(slots=True)
class _Group:
    """Answers of one window that agree on its end."""

    first_end: float
    last_end: float
    reset_s: float  # the longest reset among them (bounded)
    answers: int = 1


class WindowLearner:
    """The rate window's length from the resets of the answers in each window (see module doc)."""

    def __init__(self, *, keep: int = KEEP) -> None:
        self._peaks: deque[float] = deque(maxlen=keep)  # evidence of past windows, newest last
        self._groups: list[_Group] = []  # the current window's answers
        self.window_s = DEFAULT_WINDOW_S

    def observe(self, reset_s: float, now: float) -> None:
        """An answer about the current window, arrived at `now`, said it resets in `reset_s`."""
        reset = min(max(reset_s, MIN_WINDOW_S), MAX_WINDOW_S)
        end = now + reset_s
        # Every answer passes here: comparisons rather than min()/max() calls.
        for group in self._groups:
            first, last = group.first_end, group.last_end
            if (last if last > end else end) - (first if first < end else end) <= AGREE_S:
                group.answers += 1
                if end > last:
                    group.last_end = end
                # `_update` reads a group's answers (one or more), its first end and its reset
                # only: an answer that changes none of them leaves the length as it is.
                changed = group.answers == 2
                if end < first:
                    group.first_end = end
                    changed = True
                if reset > group.reset_s:
                    group.reset_s = reset
                    changed = True
                if changed:
                    self._update()
                return
        if len(self._groups) >= MAX_GROUPS:
            self._groups.remove(min(self._groups, key=lambda g: g.answers))
        self._groups.append(_Group(end, end, reset))
        self._update()

    def next_window(self) -> None:
        """The current window is over: its evidence joins the history (the oldest may leave)."""
        evidence = self._evidence()
        if evidence:
            self._peaks.append(evidence)
        self._groups.clear()
        self._update()

    def forget(self) -> None:
        """Start over (a reload): past windows' evidence goes, the current window's stays."""
        self._peaks.clear()
        self.window_s = DEFAULT_WINDOW_S
        self._update()

    def _evidence(self) -> float:
        """The current window's evidence (0: none yet): see the module's docstring."""
        agreed = [g for g in self._groups if g.answers >= 2]
        return min(agreed, key=_end).reset_s if agreed else 0.0

    def _update(self) -> None:
        evidence = max(max(self._peaks, default=0.0), self._evidence())
        if evidence:
            self.window_s = evidence
        elif self._groups:
            self.window_s = min(min(self._groups, key=_end).reset_s, DEFAULT_WINDOW_S)


def _end(group: _Group) -> float:
    return group.first_end
