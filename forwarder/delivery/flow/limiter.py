"""Flow control for one account: the rate limiter, adaptive concurrency and the circuit breaker.

Each piece is a small state machine driven by an injected clock, so it is unit-tested with a fake
clock and no sleeps; the dispatcher does the waiting. None of it is a library: aiolimiter and
friends are pure leaky buckets that cannot be corrected from a server's `X-RateLimit-*` headers,
and no maintained asyncio package implements AIMD concurrency or a breaker with a single probe.

The three are one module (over 400 lines) because they are one account's flow control read
together: the lane consults all three per attempt, they share the clock and `Ticket`, and each is
small (100-250 lines). The rate budget seam (`budget.py`) wraps only the rate limiter, which is
the part a shared (fleet) backend replaces.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
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
    """

    def __init__(self, per_minute: int, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.limit = per_minute  # requests per window
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

    def _new_window(self, now: float, end: float, *, confirmed: bool) -> None:
        self._window.next_window()
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
    """How many requests may be in flight: fixed, or adapted to what pays off in throughput.

    A limit is judged by the throughput (answers per second) measured at it, not by latency
    alone. By Little's law the throughput is the number in flight over the round trip: a round
    trip that grows less than in proportion to the limit (local CPU queueing, a remote with
    capacity to spare) still leaves more throughput, one that grows in proportion (past the
    remote's knee, where requests only queue) leaves the same. So a higher limit is kept only
    if it pays: compared with a lower one, it must raise the throughput by at least `PAYOFF` of
    its own relative rise (in logarithms: twice the limit needs 2**PAYOFF times the throughput).
    A lower limit is kept if it loses nothing. Between the two bars the limit stays put: noise
    does not walk it up and down.

    A ramp begins with a slow start, as in TCP: the limit doubles every window (about one round
    trip) while the latency stays within `QUEUE_TOLERANCE` of the lowest seen: the same round
    trip with twice as many in flight is twice the throughput, nothing to measure. Once the
    latency rises, the slow start goes back to the limit before the last doubling (whose
    latency shows a window late) and measures each doubling from there; the first that does not
    pay ends it, at the last limit that did. From there the limit probes a step of `STEP` up,
    kept if it pays (then the next step up at once), else a step down, kept if it loses nothing
    (then a step up again: a noisy machine must not walk the limit down step after step). The
    settled limit is measured afresh before each probe, so each comparison is with the present;
    each probe that fails doubles that pause (up to `MAX_PATIENCE` measurements), so a settled
    limit costs little probing, and one that succeeds resets it.

    A measurement waits for a warm-up (the answers to the requests in flight when the limit
    moved, at least as many as the limit), then counts `MEASURE_ROUNDS` limits' worth of
    answers (one in the slow start, whose doublings stand out of the noise). It needs demand: a
    window in which the limit was not reached (no request waited for a slot) measures nothing
    and keeps the limit where it stands. Timeouts, connection errors and 5xx halve the limit
    and end a slow start. The limit stays within `minimum`..`maximum`. Slots are handed out
    first come, first served.
    """

    ALPHA = 0.4  # EWMA weight of the newest window's latency
    QUEUE_TOLERANCE = 0.1  # latency 10% above the lowest seen: doublings must be measured
    STEP = 1.25  # a probe moves the limit by a quarter (at least one slot)
    # A higher limit must bring at least this share of its own rise in throughput (an
    # elasticity): a step of STEP needs 7.7% more, a doubling 26%. Past a knee the gain is 0.
    PAYOFF = 1 / 3
    MEASURE_ROUNDS = 3  # one round trip's worth of answers is noisy: count a few
    MAX_PATIENCE = 8  # at most this many measurements of the settled limit between probes
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
        self.past_rtt = 0.0  # smoothed latency: the length of a window
        self.base_rtt = 0.0  # lowest smoothed latency since the ramp began (or the last error)
        self._window_start = clock()
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._backpressure = False
        self._reached = False
        # Slow start, as in TCP: double while it pays, so a fresh lane reaches a high
        # concurrency in a few round trips instead of one step per trip.
        self.slow_start = True
        self._flat = True  # no queueing seen in this slow start yet: double unmeasured
        self._base = self.limit  # the settled limit: what probes are compared with
        self._base_rate = 0.0  # its throughput (0: not measured yet)
        self._probe = 0  # the limit now is the base (0), a step above it (1) or below (-1)
        self._next_probe = 1
        self._patience = 1  # measurements of the base before the next probe
        self._turnover = 0  # answers since the limit moved
        self._warmup = self.limit  # answers to wait for before measuring
        self._measure_from = 0.0  # when the warm-up ended

    @property
    def adaptive(self) -> bool:
        """False when a fixed `remote.concurrency` is configured."""
        return self.fixed == 0

    def configure(self, *, minimum: int, maximum: int, fixed: int) -> None:
        """Apply new bounds (reload); the current limit is clamped into them."""
        self.minimum, self.maximum, self.fixed = minimum, maximum, fixed
        limit = fixed or min(max(self.limit, minimum), maximum)
        if limit != self.limit or self._probe:
            self._settle(limit)
        self._wake()

    async def acquire(self) -> None:
        """Wait for a free slot (FIFO)."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        self._reached = True  # demand beyond the limit: this window measures the limit
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
        if self.adaptive and not (self.slow_start and self._flat):
            self._count_answer(now)

    def _count_answer(self, now: float) -> None:
        # Rounds of answers, not windows of time: the answers to `limit` requests in flight
        # take one round trip however they bunch, while a window's edge can split a bunch.
        self._turnover += 1
        if self._turnover == self._warmup:
            self._measure_from = now
            return
        rounds = (
            1 if self.slow_start else self.MEASURE_ROUNDS * (1 if self._probe else self._patience)
        )
        measured = self._turnover - self._warmup
        if measured >= rounds * self.limit and now > self._measure_from and not self._backpressure:
            self._judge(measured / (now - self._measure_from))

    def _end_window(self, now: float) -> None:
        mean = self._rtt_sum / self._rtt_count
        if self.adaptive:
            if self._backpressure:
                self.slow_start = False
                self.base_rtt = 0.0  # conditions changed: learn the lowest latency again
                self._patience = 1
                self._settle(max(self.minimum, math.floor(self.limit * self.ERROR_DECREASE)))
            elif not self._reached:
                # Demand, not the limit, set this window's pace: it measures nothing. The limit
                # stays (demand fits in it; going back from a probe could cut it short).
                self._settle(self.limit)
            elif self.slow_start and self._flat:
                if self.base_rtt and mean > self.base_rtt * (1 + self.QUEUE_TOLERANCE):
                    # Requests queue somewhere: measure from here on, from the limit before
                    # the last doubling (a doubling's latency shows a window late).
                    self._flat = False
                    self._settle(max(self.minimum, self.limit // 2))
                elif self.limit < self.maximum:
                    self._base = self.limit
                    self._move(min(self.maximum, self.limit * 2), 0)
                else:
                    self.slow_start = False
                    self._settle(self.limit)
        # Errors come back fast, or time out: neither is the latency of a request served.
        if not self._backpressure:
            smoothed = (1 - self.ALPHA) * self.past_rtt + self.ALPHA * mean
            self.past_rtt = smoothed if self.past_rtt else mean
            self.base_rtt = min(self.base_rtt, self.past_rtt) if self.base_rtt else self.past_rtt
        self._window_start = now
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._backpressure = False
        self._reached = self.sending >= self.limit or bool(self._waiters)

    def _pays(self, low: int, low_rate: float, high: int, high_rate: float) -> bool:
        """Does `high` in flight raise the throughput enough over `low` to be worth it?"""
        return high_rate >= low_rate * math.pow(high / low, self.PAYOFF)

    def _judge(self, rate: float) -> None:
        """The limit now has been measured at `rate` answers per second: move on."""
        base, base_rate = self._base, self._base_rate
        if self.slow_start:
            if not base_rate or self._pays(base, base_rate, self.limit, rate):
                self._base, self._base_rate = self.limit, rate
                if self.limit < self.maximum:
                    self._move(min(self.maximum, self.limit * 2), 0)
                    return
            # This doubling did not pay (or the maximum is reached): settle on the last limit
            # that did. Its slow-start figure came from a single round: measure it afresh.
            self.slow_start = False
            self._next_probe = 1
            self._settle(self._base)
        elif self._probe == 1 and self._pays(base, base_rate, self.limit, rate):
            self._base, self._base_rate, self._patience = self.limit, rate, 1
            self._probe_from(1)
        elif self._probe == -1 and rate >= base_rate:
            # The base bought nothing over this lower limit: less latency for the same pace.
            # Then up, not further down: on a busy machine a run of lucky measurements would
            # otherwise walk the limit down (too high costs latency, too low throughput).
            self._base, self._base_rate, self._patience = self.limit, rate, 1
            self._probe_from(1)
        elif self._probe:
            self._next_probe = -self._probe
            self._patience = min(self.MAX_PATIENCE, self._patience * 2)
            self._settle(base)
        else:
            self._base_rate = rate
            self._probe_from(self._next_probe)

    def _probe_from(self, direction: int) -> None:
        """Try a step from the base in `direction`, else the other way, else stay."""
        up = min(self.maximum, max(self._base + 1, math.ceil(self._base * self.STEP)))
        down = max(self.minimum, min(self._base - 1, math.floor(self._base / self.STEP)))
        for way in (direction, -direction):
            step = up if way == 1 else down
            if step != self._base:
                self._move(step, way)
                return
        self._settle(self._base)

    def _settle(self, limit: int) -> None:
        """Make `limit` the base, to be measured (again) before the next probe."""
        if limit != self._base:
            self._base_rate = 0.0
        self._base = limit
        self._move(limit, 0)

    def _move(self, limit: int, probe: int) -> None:
        self.limit = limit
        self._probe = probe
        self._turnover = 0
        # Whatever is in flight now left under the old limit, and the first round at a
        # higher limit leaves in one burst: wait for both to come back before measuring.
        self._warmup = max(limit, self.sending)
        self._wake()

    def restart(self) -> None:
        """Back to the minimum (the remote was down): it ramps up again from there, fast."""
        if self.adaptive:
            self.slow_start = self._flat = True
            self.base_rtt = 0.0
            self._patience = 1
            self._settle(self.minimum)


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
