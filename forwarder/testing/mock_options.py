"""The mock remote's options: what it does (its key, rate limit and window, injected faults).

Checked at construction (so a bad command-line flag fails before serving) and again by
``POST /_mock/faults``, which may change the ones in `TUNABLE` while it runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

__all__ = ["MAX_WINDOW_S", "MIN_WINDOW_S", "TUNABLE", "WINDOW_S", "MockOptions", "check_option"]

# The real API's rate window; MockOptions.window_s defaults to it.
WINDOW_S: Final = 60.0
# Bounds of MockOptions.window_s: short windows for benchmarks, at most an hour.
MIN_WINDOW_S: Final = 0.1
MAX_WINDOW_S: Final = 3600.0
# Options that /_mock/faults may change; seed is fixed at construction.
TUNABLE: Final = (
    "api_key",
    "rate_limit",
    "window_s",
    "latency_ms",
    "fail_rate",
    "reset_rate",
    "timeout_rate",
    "throttle_rate",
    "hang_s",
)
_RATES: Final = ("fail_rate", "reset_rate", "timeout_rate", "throttle_rate")


def check_option(name: str, value: object) -> object:
    """Return ``value`` normalised for option ``name``, or raise ValueError saying why not."""
    if name == "api_key":
        # A colon cannot survive Basic auth's user:password encoding.
        if not isinstance(value, str) or not value or ":" in value:
            raise ValueError("api_key must be a non-empty string without ':'")
        return value
    if name == "rate_limit":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("rate_limit must be an integer >= 0 (0 = unlimited)")
        return value
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError("seed must be an integer or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    number = float(value)
    if name in _RATES and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1")
    if name == "latency_ms" and number < 0.0:
        raise ValueError("latency_ms must be >= 0")
    if name == "hang_s" and number <= 0.0:
        raise ValueError("hang_s must be > 0")
    if name == "window_s" and not MIN_WINDOW_S <= number <= MAX_WINDOW_S:
        raise ValueError(f"window_s must be between {MIN_WINDOW_S:g} and {MAX_WINDOW_S:g} seconds")
    return number


@dataclass
class MockOptions:
    """Behaviour of a :class:`MockRemote`; mutable at runtime (``/_mock/faults`` validates).

    Rates are probabilities per request between 0 and 1. ``rate_limit`` is requests per minute
    per key, 0 for unlimited. ``window_s`` is the length of the fixed rate window (0.1 to 3600
    seconds, default the real API's 60): each window allows
    ``max(1, round(rate_limit * window_s / 60))`` requests, the same average rate in shorter
    windows, which is what a benchmark wants. ``X-RateLimit-Limit`` reports that per-window
    quota and ``X-RateLimit-Reset`` the seconds until the window ends, rounded up to whole
    seconds like the real API's (so with a window under a second it still says 1).
    ``hang_s`` is how long a timeout-faulted request is held before the connection is dropped.
    ``throttle_rate`` answers that share 429 without performing the request, as if another
    client on the same key had just spent the window's quota: ``X-RateLimit-Remaining: 0``,
    ``X-RateLimit-Reset`` and a ``Retry-After`` of the seconds left in the window.
    ``seed`` makes the fault rolls reproducible.
    """

    api_key: str = "test-key"
    rate_limit: int = 300
    window_s: float = WINDOW_S
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    reset_rate: float = 0.0
    timeout_rate: float = 0.0
    throttle_rate: float = 0.0
    hang_s: float = 600.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Fail at construction (e.g. from CLI flags) rather than on the first request.
        for f in fields(self):
            setattr(self, f.name, check_option(f.name, getattr(self, f.name)))

    def public(self) -> dict[str, Any]:
        """The options as JSON, with the API key's value withheld."""
        shown = asdict(self)
        shown["api_key"] = "<set>"
        return shown

    def quota(self) -> int:
        """Requests allowed per key and window; 0 means unlimited."""
        if self.rate_limit == 0:
            return 0
        # Same average rate as rate_limit per minute; at least one request per window.
        return max(1, round(self.rate_limit * self.window_s / 60.0))
