"""What the mock remote's platform keeps: created events, idempotency keys, rate windows, counters.

`MockPlatform` is the account model without HTTP: it creates an event (or answers a repeat from
the idempotency store), counts requests in fixed per-key rate windows and says what the
``X-RateLimit-*`` headers report, and rolls the injected faults. `MockRemote`
(``forwarder.testing.mock_remote``) serves it over HTTP.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypedDict

from forwarder.testing.mock_options import MockOptions

__all__ = [
    "FIELDS",
    "IDEMPOTENCY_TTL_S",
    "UNLIMITED_LIMIT",
    "Duplicate",
    "DuplicateRecord",
    "EventRecord",
    "MockPlatform",
    "MockStats",
    "Rejected",
    "now_text",
]

IDEMPOTENCY_TTL_S: Final = 24 * 60 * 60.0
# Rate windows whose request counts MockStats keeps.
KEPT_WINDOWS: Final = 1000
# What the headers advertise when rate_limit is 0 (unlimited): clients still see a sane quota.
UNLIMITED_LIMIT: Final = 1_000_000

FIELDS: Final = ("recipient_id", "name", "value", "conversion", "data", "ref")


@dataclass
class MockStats:
    """Counters since start or the last reset.

    ``rate_limited`` counts the 429s of the real quota and ``throttled`` the injected ones
    (``throttle_rate``). ``first_rate_limited_at`` and ``last_rate_limited_at`` are the UNIX
    times (wall clock, not the mock's injectable monotonic clock) of the first and the latest
    quota 429, None before any: a benchmark can tell from them whether rate limiting happened
    only in the first window. ``window_counts`` holds the requests of each of the last
    `KEPT_WINDOWS` rate windows (the current one last, 429s included): a test of a fleet sees
    whether any window went over the quota.
    """

    requests: int = 0
    created: int = 0
    duplicates: int = 0
    conflicts: int = 0
    rate_limited: int = 0
    throttled: int = 0
    unauthorized: int = 0
    invalid: int = 0
    failed: int = 0
    resets: int = 0
    timeouts: int = 0
    first_rate_limited_at: float | None = None
    last_rate_limited_at: float | None = None
    window_counts: list[int] = field(default_factory=list)


class EventRecord(TypedDict):
    """One created event, fields exactly as received ("" when absent)."""

    id: int
    recipient_id: str
    name: str
    value: str
    conversion: str
    data: str
    ref: str
    idempotency_key: str
    auth_user: str
    received_at: str


class DuplicateRecord(TypedDict):
    """One 409: a repeat absorbed by its idempotency key (nothing was created)."""

    idempotency_key: str
    id: object  # the remote id of the event the key created first
    received_at: str


@dataclass
class _Window:
    started: float
    count: int = 0


@dataclass(frozen=True)
class _Remembered:
    fingerprint: tuple[str, ...]
    body: dict[str, Any]
    expires_at: float


class Rejected(Exception):
    """A request answered with an error; raised inside the create handler."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class Duplicate(Exception):
    """An idempotent repeat: answered 409 with the original body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("duplicate")
        self.body = body


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class MockPlatform:
    """The fake remote's state: options, created events, idempotency store, rate windows, counters.

    ``clock`` (monotonic seconds) drives the rate windows and key expiry; tests may replace it.
    """

    def __init__(
        self,
        options: MockOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Create a mock with ``options`` (defaults if None)."""
        self.options = options if options is not None else MockOptions()
        self.clock = clock
        self.events: list[EventRecord] = []
        self.duplicates: list[DuplicateRecord] = []
        self.stats = MockStats()
        self._idempotency: dict[tuple[str, str], _Remembered] = {}
        self._windows: dict[str, _Window] = {}
        self._next_id = 1
        self._hanging = 0
        self._rng = random.Random(self.options.seed)

    @property
    def hanging(self) -> int:
        """How many timeout-faulted requests are being held right now."""
        return self._hanging

    def reset(self) -> None:
        """Forget events, 409s, idempotency keys, rate windows and counters; ids restart at 1."""
        self.events.clear()
        self.duplicates.clear()
        self.stats = MockStats()
        self._idempotency.clear()
        self._windows.clear()
        self._next_id = 1
        # Re-seed so a reset run replays the same faults.
        self._rng = random.Random(self.options.seed)

    def _create_event(
        self,
        api_key: str,
        auth_user: str,
        received: Mapping[str, str],
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        """Create and record the event (or answer from the idempotency store)."""
        now = self.clock()
        fingerprint = tuple(received[name] for name in FIELDS)
        if idempotency_key is not None:
            self._expire_keys(now)
            # Keys are per account, like the real platform's.
            remembered = self._idempotency.get((api_key, idempotency_key))
            if remembered is not None:
                if remembered.fingerprint != fingerprint:
                    raise Rejected(422, "idempotency key reused with a different request")
                raise Duplicate(remembered.body)

        event_id = self._next_id
        self._next_id += 1
        self.events.append(
            EventRecord(
                id=event_id,
                recipient_id=received["recipient_id"],
                name=received["name"],
                value=received["value"],
                conversion=received["conversion"],
                data=received["data"],
                ref=received["ref"],
                idempotency_key=idempotency_key or "",
                auth_user=auth_user,
                received_at=now_text(),
            )
        )
        self.stats.created += 1
        body: dict[str, Any] = {"success": True, "data": event_id}
        if idempotency_key is not None:
            self._idempotency[(api_key, idempotency_key)] = _Remembered(
                fingerprint, body, now + IDEMPOTENCY_TTL_S
            )
        return body

    def _expire_keys(self, now: float) -> None:
        # Insertion order is expiry order, so expired keys are all at the front.
        while self._idempotency:
            oldest = next(iter(self._idempotency))
            if self._idempotency[oldest].expires_at > now:
                break
            del self._idempotency[oldest]

    def _roll(self, rate: float) -> bool:
        # Draw only for active faults so a seed replays the same way for the same options.
        return rate > 0 and self._rng.random() < rate

    # --- rate limit ---------------------------------------------------------------------

    def _count_rate_limited(self) -> None:
        self.stats.rate_limited += 1
        # Wall clock, so a benchmark can compare it with its own start time.
        at = time.time()
        if self.stats.first_rate_limited_at is None:
            self.stats.first_rate_limited_at = at
        self.stats.last_rate_limited_at = at

    def _window(self, key: str, now: float) -> _Window:
        window = self._windows.get(key)
        # The current window_s: a window shortened through /_mock/faults ends sooner.
        if window is None or now - window.started >= self.options.window_s:
            window = self._windows[key] = _Window(started=now)
            counts = self.stats.window_counts
            counts.append(0)
            del counts[:-KEPT_WINDOWS]
        return window

    def _rate_headers(self, window: _Window | None, now: float) -> dict[str, str]:
        window_s = self.options.window_s
        limit = self.options.quota() or UNLIMITED_LIMIT
        # Whole seconds like the real API, rounded up: a sub-second window still says 1.
        longest = math.ceil(window_s)
        if window is None or now - window.started >= window_s:
            used, reset = 0, longest
        else:
            # Elapsed first: started + 60 - now can round just above 60 and ceil to 61.
            used, reset = window.count, math.ceil(window_s - (now - window.started))
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, limit - used)),
            "X-RateLimit-Reset": str(min(longest, max(0, reset))),
        }
