"""Flow control for one account: the rate limiter, adaptive concurrency and the circuit breaker.

Each piece is a small state machine driven by an injected clock, so it is unit-tested with a fake
clock and no sleeps; the dispatcher does the waiting. None of it is a library: aiolimiter and
friends are pure leaky buckets that cannot be corrected from a server's `X-RateLimit-*` headers,
and no maintained asyncio package implements AIMD concurrency or a breaker with a single probe.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]

# Longest window the limiter believes a server's rate window can be.
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
    noticed). A 429 closes the gate for the whole account until the reset: retries take tokens
    like any request.
    """

    def __init__(self, per_minute: int, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.limit = per_minute  # requests per window
        self.window_s = 60.0
        self._learned_window = 0.0
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
    def rate(self) -> float:
        """Pace in requests per second."""
        return self.limit / self.window_s

    @property
    def capacity(self) -> float:
        """Largest burst the bucket allows: a quarter second's worth (after a pause, too)."""
        return max(1.0, self.rate * BURST_S)

    @property
    def remaining(self) -> int:
        """Requests still allowed in the current window, as far as we know."""
        return max(0, self.limit - self._started - self._external)

    @property
    def tokens(self) -> float:
        """Tokens in the pacing bucket now."""
        self._refill(self._clock())
        return self._tokens

    def set_per_minute(self, per_minute: int) -> None:
        """Apply a configured quota (reload). Server headers still correct it afterwards."""
        self.limit = max(1, round(per_minute * self.window_s / 60.0))

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
            # The longest reset ever seen is the window's length (seen right after it starts).
            self._learned_window = max(self._learned_window, reset_s, 1.0)
            self.window_s = self._learned_window
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
        if remaining is not None and ticket.epoch == self._epoch:
            used_by_server = self.limit - remaining
            self._external = max(self._external, used_by_server - self._started)
        if rate_limited:
            self.rate_limited += 1
            waits = [w for w in (reset_s, retry_after) if w is not None and w > 0]
            wait = max(waits) if waits else DEFAULT_429_WAIT_S
            self.gate_until = max(self.gate_until, now + wait)
            # Nothing more fits in this window; the next one starts when the gate opens.
            self._window_end = now + wait
            self._confirmed = True
            self._external = self.limit

    def _new_window(self, now: float, end: float, *, confirmed: bool) -> None:
        self._epoch += 1
        self._started = 0
        self._external = 0
        self._window_end = end
        self._confirmed = confirmed

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._refilled_at)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._refilled_at = now


class ConcurrencyController:
    """How many requests may be in flight: fixed, or adapted by AIMD.

    In the spirit of Vector's adaptive request concurrency: time is cut into windows about one
    round trip long. After a window in which the limit was actually reached, latency held steady
    and nothing pushed back, the limit grows by one (doubles, during the slow start that begins
    each ramp and ends at the first cut or sign of queueing). Steady means within
    `QUEUE_TOLERANCE` of the lowest (smoothed) latency since the limit last went down: past the
    remote's capacity each step adds a little latency (requests queue), too little to count as a
    jump, and a moving average would follow that rise up to `maximum`. Timeouts, connection
    errors and 5xx halve the limit; a latency jump (beyond the long-run mean plus its deviation)
    cuts it by a tenth; either way the lowest latency is learned afresh. A slow start ends by
    halving: its last doubling overshot. The limit stays within `minimum`..`maximum`. Slots are
    handed out first come, first served.
    """

    ALPHA = 0.4  # EWMA weight of the newest window's latency
    DEVIATION_SCALE = 2.5
    JUMP_FLOOR = 0.1  # a latency rise under 10% of the mean is never a jump
    QUEUE_TOLERANCE = 0.1  # latency 10% above the lowest seen: requests queue, no growth
    LATENCY_DECREASE = 0.9
    ERROR_DECREASE = 0.5
    MIN_WINDOW_S = 0.05

    def __init__(
        self, *, minimum: int, maximum: int, fixed: int = 0, clock: Clock = time.monotonic
    ) -> None:
        self._clock = clock
        self.minimum = minimum
        self.maximum = maximum
        self.fixed = fixed
        self.limit = fixed or minimum
        self.in_use = 0
        self.sending = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.past_rtt = 0.0
        self.base_rtt = 0.0  # lowest smoothed latency since the limit last went down
        self._level = 0.0  # that smoothed latency (an EWMA like `past_rtt`, reseeded on a cut)
        self._deviation = 0.0
        self._window_start = clock()
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._backpressure = False
        self._reached = False
        # Slow start, as in TCP: double per window until the first sign of a limit, so a fresh
        # lane reaches a high concurrency in a few round trips instead of one step per trip.
        self.slow_start = True

    @property
    def adaptive(self) -> bool:
        """False when a fixed `remote.concurrency` is configured."""
        return self.fixed == 0

    def configure(self, *, minimum: int, maximum: int, fixed: int) -> None:
        """Apply new bounds (reload); the current limit is clamped into them."""
        self.minimum, self.maximum, self.fixed = minimum, maximum, fixed
        self.limit = fixed or min(max(self.limit, minimum), maximum)
        self._wake()

    async def acquire(self) -> None:
        """Wait for a free slot (FIFO)."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            elif waiter in self._waiters:  # `_wake` may have dropped it already
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back."""
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    def request_started(self) -> None:
        """A request leaves now (the slot holder got past the gates and the rate limiter)."""
        self.sending += 1
        if self.sending >= self.limit:
            self._reached = True

    def request_finished(self, rtt_s: float, *, backpressure: bool) -> None:
        """A request came back after `rtt_s`; `backpressure` for timeouts, errors and 5xx."""
        self.sending -= 1
        self._rtt_sum += rtt_s
        self._rtt_count += 1
        self._backpressure = self._backpressure or backpressure
        now = self._clock()
        if now - self._window_start >= max(self.past_rtt, self.MIN_WINDOW_S):
            self._end_window(now)

    def _end_window(self, now: float) -> None:
        mean = self._rtt_sum / self._rtt_count if self._rtt_count else self.past_rtt
        if self.adaptive:
            threshold = max(self._deviation * self.DEVIATION_SCALE, self.past_rtt * self.JUMP_FLOOR)
            queueing = self.base_rtt > 0 and mean > self.base_rtt * (1 + self.QUEUE_TOLERANCE)
            jump = bool(self.past_rtt) and mean > self.past_rtt + threshold
            if self._backpressure:
                self._decrease(self.ERROR_DECREASE)
            elif self.slow_start and (jump or queueing):
                # The last doubling overshot (its effect shows a window late): back to where
                # latency was still fine, keeping the base latency learned on the way up.
                self.limit = max(self.minimum, self.limit // 2)
                self.slow_start = False
            elif jump:
                self._decrease(self.LATENCY_DECREASE)
            elif self._reached and not queueing and self.limit < self.maximum:
                grown = self.limit * 2 if self.slow_start else self.limit + 1
                self.limit = min(self.maximum, grown)
                self._wake()
        if self._rtt_count:
            if self.past_rtt:
                self._deviation = (1 - self.ALPHA) * self._deviation + self.ALPHA * abs(
                    mean - self.past_rtt
                )
                self.past_rtt = (1 - self.ALPHA) * self.past_rtt + self.ALPHA * mean
            else:
                self.past_rtt = mean
            # The lowest of a smoothed latency (one lucky window must not set the bar), seeded
            # afresh after a cut: from the window that caused it, at the latency of the moment;
            # `past_rtt` would still be catching up from below. Errors say nothing of latency.
            if not self._backpressure:
                if self.base_rtt:
                    self._level = (1 - self.ALPHA) * self._level + self.ALPHA * mean
                    self.base_rtt = min(self.base_rtt, self._level)
                else:
                    self._level = self.base_rtt = mean
        self._window_start = now
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._backpressure = False
        self._reached = self.sending >= self.limit

    def _decrease(self, factor: float) -> None:
        self.limit = max(self.minimum, math.floor(self.limit * factor))
        self.base_rtt = 0.0  # conditions changed: learn the lowest latency again
        self.slow_start = False

    def restart(self) -> None:
        """Back to the minimum (the remote was down): it ramps up again from there, fast."""
        if self.adaptive:
            self._decrease(0.0)
            self.slow_start = True


class BreakerState(enum.Enum):
    """Where the circuit breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops sending after `failures` consecutive failures; one probe at growing intervals.

    While open, every attempt waits; when the interval has passed, exactly one attempt (the
    probe) goes through. Its success closes the breaker; its failure reopens it for twice the
    interval, up to `probe_max_s`. Any success closes it.
    """

    def __init__(
        self,
        *,
        failures: int,
        probe_initial_s: float,
        probe_max_s: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        self.threshold = failures
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.state = BreakerState.CLOSED
        self.consecutive = 0
        self.interval_s = probe_initial_s
        self.opened_at = 0.0
        self._retry_at = 0.0
        self._probing = False
        self.opened = 0  # times it opened
        self.last_error = ""

    def configure(self, *, failures: int, probe_initial_s: float, probe_max_s: float) -> None:
        """Apply new settings (reload); a breaker that is open stays open."""
        self.threshold = failures
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.interval_s = min(max(self.interval_s, probe_initial_s), probe_max_s)

    @property
    def is_open(self) -> bool:
        """True unless closed (open or waiting for its probe)."""
        return self.state is not BreakerState.CLOSED

    def permit(self) -> bool | float:
        """True to send now (as the probe when not closed), else seconds to wait before asking."""
        if self.state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if self._probing:
            return max(self.interval_s, 0.05)  # woken sooner when the probe's answer comes
        if now < self._retry_at:
            return self._retry_at - now
        self.state = BreakerState.HALF_OPEN
        self._probing = True
        return True

    def abandon(self) -> None:
        """The probe was cancelled before it had an answer: let another attempt probe."""
        self._probing = False

    def success(self) -> bool:
        """Record a success; returns True when this closed an open breaker."""
        self.consecutive = 0
        self._probing = False
        if self.state is BreakerState.CLOSED:
            return False
        self.state = BreakerState.CLOSED
        self.interval_s = self.probe_initial_s
        return True

    def failure(self, error: str = "", *, probe: bool = False) -> bool:
        """Record a failure; returns True when this opened (or reopened) the breaker.

        `probe` says the attempt was the one `permit` let through while not closed. Failures of
        requests sent before the breaker opened change nothing once it is open.
        """
        self.consecutive += 1
        self.last_error = error
        now = self._clock()
        if self.state is BreakerState.CLOSED:
            if self.consecutive < self.threshold:
                return False
            self.opened += 1
            self.opened_at = now
            self.interval_s = self.probe_initial_s
        elif probe:
            self.interval_s = min(self.interval_s * 2, self.probe_max_s)
        else:
            return False
        self.state = BreakerState.OPEN
        self._probing = False
        self._retry_at = now + self.interval_s
        return True
