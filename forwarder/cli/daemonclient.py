"""Talking to a running daemon as an app does: over TCP or its Unix socket, with the intake token.

`forwarder send`, `forwarder events show` and `forwarder status` all do this; one place keeps the
connector, the token header and what "unreachable" means the same for the three.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp


class Unreachable(Exception):
    """No daemon answered at the address (refused, no such socket, timed out)."""


@dataclass(frozen=True)
class Target:
    """Where the daemon answers, and the intake token it wants (if any)."""

    url: str = "http://127.0.0.1:8787"
    socket: str | None = None
    token: str = field(default="", repr=False)

    @property
    def base(self) -> str:
        """The URL requests go to (any host does over a Unix socket)."""
        return "http://localhost" if self.socket else self.url.rstrip("/")

    def describe(self) -> str:
        """Where we looked, for messages (never the token)."""
        return f"unix:{self.socket}" if self.socket else self.url

    def headers(self) -> dict[str, str]:
        """The intake token's header, when there is a token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def session(self, timeout_s: float | None = None) -> aiohttp.ClientSession:
        """A client session to the daemon (one per command; `--watch` keeps it)."""
        connector = aiohttp.UnixConnector(path=self.socket) if self.socket else None
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def request(
    session: aiohttp.ClientSession,
    target: Target,
    method: str,
    path: str,
    *,
    timeout_s: float,
    data: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request to the daemon: its status and body; Unreachable when nothing answers."""
    try:
        async with session.request(
            method,
            f"{target.base}{path}",
            data=data,
            headers=target.headers(),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise Unreachable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc


async def request_once(
    target: Target, method: str, path: str, *, timeout_s: float, data: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """`request` in a session of its own, for a command that asks once."""
    async with target.session() as session:
        return await request(session, target, method, path, timeout_s=timeout_s, data=data)
