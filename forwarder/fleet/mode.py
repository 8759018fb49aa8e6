"""Which mode this host is in: "fleet" (Redis answers) or "fallback" (it does not).

One `FleetMode` per process. A Redis call that fails (`RedisUnavailable`) puts the host in
fallback: the budgets stop calling Redis and serve from a local bucket at the learnt limit
divided by the live members last seen. The members' heartbeat keeps calling Redis; its first
success brings the host back. Entering and leaving are one log line each (`fleet_fallback`,
`fleet_recovered`), so an outage that lasts minutes does not flood the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("forwarder.fleet")

FLEET = "fleet"
FALLBACK = "fallback"


class FleetMode:
    """This host's fleet mode and the live members it last saw (at least itself)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.fallback = False
        self.live_members = 1
        self.fallbacks = 0  # times the host entered fallback
        self._since = clock()

    @property
    def name(self) -> str:
        """ "fleet" or "fallback" (for /v1/stats, the metrics, STATUS=)."""
        return FALLBACK if self.fallback else FLEET

    def seen(self, live_members: int) -> None:
        """The heartbeat counted the live members (itself included)."""
        self.live_members = max(1, live_members)

    def lost(self, reason: str) -> None:
        """A Redis call failed: serve locally until Redis answers again."""
        if self.fallback:
            return
        self.fallback = True
        self.fallbacks += 1
        self._since = self._clock()
        log.warning(
            "fleet_fallback",
            reason=reason,
            live_members=self.live_members,
            note="rate budgets are local: the learnt limit divided by the live members",
        )

    def back(self) -> None:
        """Redis answered again: the shared budgets are used from now on."""
        if not self.fallback:
            return
        self.fallback = False
        log.info("fleet_recovered", fallback_s=round(self._clock() - self._since, 3))
