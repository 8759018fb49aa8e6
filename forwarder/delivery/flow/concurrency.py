"""Adaptive concurrency: how many of an account's requests may be in flight.

A state machine driven by an injected clock (unit-tested with a fake one); the lane holds the
slots. No maintained asyncio package adapts a concurrency limit to measured throughput (AIMD with
a slow start), so it is written here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


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
