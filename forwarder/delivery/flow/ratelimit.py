"""The rate limiter: one account's requests paced under the quota the remote states.

A state machine driven by an injected clock, so it is unit-tested with a fake clock and no sleeps;
the lane does the waiting (through the rate budget seam, `budget.py`, whose local backend wraps
this). Not a library: aiolimiter and friends are pure leaky buckets that cannot be corrected from
a server's `X-RateLimit-*` headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from forwarder.delivery.flow.ratewindow import MAX_WINDOW_S as MAX_PACED_WINDOW_S
from forwarder.delivery.flow.ratewindow import WindowLearner

Clock = Callable[[], float]

# Longest reset the limiter believes for the end of a server's window (its length, for pacing,
# is bounded tighter: `ratewindow`).
MAX_WINDOW_S = 3600.0
# The pacing bucket holds this many seconds of the rate: a backlog goes out evenly, and a lane
# coming back from a pause (gate, breaker, spent quota) does not burst a whole second at once.
BURST_S = 0.25
# A 429 that names no wait still holds the account this long.
DEFAULT_429_WAIT_S = 1.0
# `X-RateLimit-Reset` is whole seconds rounded up: an end estimate may be this much late.
RESET_GRANULARITY_S = 1.0
# Added to every wait `reserve` returns: float rounding of `now + wait` must never leave the
# waiter a hair short (a refill of 0.9999999999 token), to be told to wait 1e-14 s again.
WAIT_MARGIN_S = 1e-6


@dataclass(frozen=True, slots=True)
class Ticket:
    """Permission for one request, tagged with the rate window it was counted in."""

    epoch: int


class RateLimiter:
    """A token bucket that paces requests, under a per-window quota learned from the server.

    The bucket refills at `limit / window` per second and holds at most a quarter second's
    worth, so a backlog goes out evenly instead of as one burst. On top, the limiter counts the
    requests it started in the server's current window and never starts more than the server's
    quota; each answer's `X-RateLimit-Limit`, `-Remaining` and `-Reset` correct the quota, the
    window's end and its length (so a plan upgrade, or another client using the same key, is
    noticed; the length is learned without trusting one answer: `ratewindow`). A 429 closes the
    gate for the whole account until the reset: retries take tokens like any request.

    `share` (None: the whole quota) is for one of several clients counting against the same
    remote count (a fleet member while Redis is out): it caps the requests this limiter starts
    per window and paces at `share / window`, while the remote's count (`limit`, what
    `X-RateLimit-Remaining` says the others used) still stops it when the window is spent. So
    the others' requests narrow only the window's remainder, not this client's share as well.
    """

    def __init__(self, per_minute: int, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.limit = per_minute  # requests per window
        self.share: int | None = None  # this client's own cap per window (see the class doc)
        self._own_cap: int | None = None  # the share in force in the current window
        self._window = WindowLearner()
        now = clock()
        self._epoch = 0
        self._started = 0  # requests started in this window
        self._external = 0  # the server counted this many more than we started
        self._window_end = now + self.window_s
        self._confirmed = False  # has the server told us when this window ends?
        self._tokens = 1.0
        self._refilled_at = now
        self.gate_until = 0.0
        self.rate_limited = 0  # 429s seen

    @property
    def window_s(self) -> float:
        """The server's rate window, as learned so far (60 s until answers say otherwise)."""
        return self._window.window_s

    @property
    def epoch(self) -> int:
        """The number of the window the limiter counts in now (a `Ticket` carries it)."""
        return self._epoch

    @property
    def rate(self) -> float:
        """Pace in requests per second (of the share, when there is one)."""
        return (self.limit if self.share is None else self.share) / self.window_s

    @property
    def capacity(self) -> float:
        """Largest burst the bucket allows: a quarter second's worth (after a pause, too)."""
        return max(1.0, self.rate * BURST_S)

    @property
    def remaining(self) -> int:
        """Requests still allowed in the current window, as far as we know."""
        left = self.limit - self._started - self._external
        own = self._own_cap
        if self.share is not None:
            # A share set mid-window (fallback began) applies at once; a smaller one wins.
            own = self.share if own is None else min(own, self.share)
        if own is not None:
            left = min(left, own - self._started)
        return max(0, left)

    @property
    def started(self) -> int:
        """Requests this limiter started in its current window."""
        return self._started

    @property
    def tokens(self) -> float:
        """Tokens in the pacing bucket now."""
        self._refill(self._clock())
        return self._tokens

    def set_per_minute(self, per_minute: int) -> None:
        """Apply a configured quota (reload). Server headers still correct it afterwards."""
        self.limit = max(1, round(per_minute * self.window_s / 60.0))

    def relearn_window(self) -> None:
        """Forget the window lengths learned from past windows (a reload): answers teach it anew."""
        self._window.forget()

    def reserve(self) -> Ticket | float:
        """Take permission for one request now, or return how many seconds to wait first."""
        now = self._clock()
        if now < self.gate_until:
            return self.gate_until - now + WAIT_MARGIN_S
        if now >= self._window_end:
            self._new_window(now, now + self.window_s, confirmed=False)
        if self.remaining <= 0:
            return max(self._window_end - now + WAIT_MARGIN_S, 0.001)
        self._refill(now)
        if self._tokens < 1.0:
            return (1.0 - self._tokens) / self.rate + WAIT_MARGIN_S
        self._tokens -= 1.0
        self._started += 1
        return Ticket(self._epoch)

    def observe(
        self,
        ticket: Ticket,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        reset_s: float | None = None,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """Correct the model from one answer's headers (any of them may be missing)."""
        now = self._clock()
        if limit is not None and limit > 0:
            self.limit = limit
        if reset_s is not None and 0 <= reset_s <= MAX_WINDOW_S:
            end = now + reset_s
            if ticket.epoch == self._epoch:
                if not self._confirmed:
                    self._window_end, self._confirmed = end, True
                elif end > self._window_end + RESET_GRANULARITY_S:
                    # The server started a new window we had not accounted for.
                    self._new_window(now, end, confirmed=True)
                else:
                    # Reset is rounded up, so every answer gives an upper bound: keep the lowest.
                    self._window_end = min(self._window_end, end)
                # Only answers about the current window tell its length.
                self._window.observe(reset_s, now)
        if remaining is not None and ticket.epoch == self._epoch:
            used_by_server = self.limit - remaining
            self._external = max(self._external, used_by_server - self._started)
        if rate_limited:
            self.rate_limited += 1
            # The reset counts up to a window's longest (`_wait_hint`'s reason); Retry-After whole.
            reset_wait = min(reset_s, MAX_PACED_WINDOW_S) if reset_s is not None else None
            waits = [w for w in (reset_wait, retry_after) if w is not None and w > 0]
            wait = max(waits) if waits else DEFAULT_429_WAIT_S
            self.gate_until = max(self.gate_until, now + wait)
            # Nothing more fits in this window; the next one starts when the gate opens.
            self._window_end = now + wait
            self._confirmed = True
            self._external = self.limit

    def take_over_window(self, end: float, remaining: int, *, own: int | None = None) -> None:
        """Count on in a window another counter kept until now (the fleet's shared budget): it
        ends at `end` (this clock) with `remaining` of the quota left in it, of which this
        limiter may start `own` (None: all). A window already over is not taken: the next one
        starts fresh."""
        now = self._clock()
        if end <= now:
            return
        self._new_window(now, end, confirmed=True)
        self._external = max(0, self.limit - max(0, remaining))
        if own is not None:
            self._own_cap = max(0, own)

    def _new_window(self, now: float, end: float, *, confirmed: bool) -> None:
        self._window.next_window()
        self._epoch += 1
        self._started = 0
        self._external = 0
        self._own_cap = self.share
        self._window_end = end
        self._confirmed = confirmed

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._refilled_at)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._refilled_at = now
