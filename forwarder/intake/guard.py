"""The limits of intake's connections and their counters: `ConnectionGuard`, and the canned 503.

A reload may change the limits (new connections use the new ones); the counters feed
`/v1/stats` and `/metrics`, and each refusal or timeout logs one throttled warning. How a
connection enforces them is connections.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from forwarder.ops.logthrottle import LogThrottle

log = structlog.get_logger("forwarder.connections")
# Connections past max_connections that may still ask for these, one answer each.
HEALTH_RESERVE = 8
HEALTH_ROUTES = frozenset(
    (method, path) for method in ("GET", "HEAD") for path in ("/healthz", "/readyz")
)

REFUSAL_JSON = {
    "success": False,
    "error": "too many open connections (intake.max_connections); retry later",
    "reason": "too_many_connections",
}
_REFUSAL_BODY = json.dumps(REFUSAL_JSON).encode()
# Written straight to the socket: the connection is never handed to aiohttp's parser.
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _REFUSAL_BODY
)


@dataclass(slots=True)
class ConnectionGuard:
    """The limits (a reload may change them; new connections use the new ones) and counters."""

    max_connections: int
    header_timeout_s: float
    keepalive_timeout_s: float
    write_timeout_s: float = 10.0
    # Every log line here can repeat once per connection or request: one throttle for them all.
    throttle: LogThrottle = field(default_factory=LogThrottle)
    open: int = 0
    refused: int = 0  # connections past max_connections, answered 503 and closed
    header_timeouts: int = 0  # connections closed for a request head that did not arrive
    write_timeouts: int = 0  # connections aborted: an answer waited on a full socket too long

    def view(self) -> dict[str, Any]:
        """For /v1/stats."""
        return {
            "open": self.open,
            "max_connections": self.max_connections,
            "health_reserve": HEALTH_RESERVE,
            "refused": self.refused,
            "header_timeouts": self.header_timeouts,
            "write_timeouts": self.write_timeouts,
        }

    def count_refused(self) -> None:
        """A connection (or a reserve connection's request) past the cap was refused."""
        self.refused += 1
        self.throttle.log(
            log,
            "warning",
            "connections_refused",
            open=self.open,
            max_connections=self.max_connections,
            total=self.refused,
        )

    def count_slow(self) -> None:
        """A connection was closed for a request head that did not arrive in time."""
        self.header_timeouts += 1
        self.throttle.log(
            log,
            "warning",
            "slow_client_closed",
            header_timeout_s=self.header_timeout_s,
            total=self.header_timeouts,
        )

    def count_write_timeout(self, unsent: int) -> None:
        """A connection was aborted: its answers waited on a full socket past write_timeout_s."""
        self.write_timeouts += 1
        self.throttle.log(
            log,
            "warning",
            "unread_client_closed",
            write_timeout_s=self.write_timeout_s,
            unsent_bytes=unsent,
            total=self.write_timeouts,
        )

    def count_bad_request(self, status: int, fault: str, kind: str) -> None:
        """aiohttp's parser refused a request (or its Expect): a warning, no traceback."""
        self.throttle.log(log, "warning", "bad_request", key=kind, status=status, error=fault)
