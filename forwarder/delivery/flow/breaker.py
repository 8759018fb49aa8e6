"""The circuit breaker: stop sending to a failing remote, and probe it one attempt at a time.

Driven by an injected clock (unit-tested with a fake one). No maintained asyncio breaker has
the single probe at growing intervals that a rate-limited remote needs, so it is written here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

Clock = Callable[[], float]


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
