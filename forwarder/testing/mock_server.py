"""Serving a mock remote on a port: in process (`start_mock`) or as ``forwarder mock-remote``."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from forwarder.testing.mock_options import MockOptions
from forwarder.testing.mock_remote import MockRemote

__all__ = ["RunningMock", "serve_mock", "start_mock"]

# Default for the runner: shutdown hooks release hanging requests at once, so this only bounds
# handlers that are somewhere else (e.g. reading a slow body).
SHUTDOWN_TIMEOUT_S: Final = 0.25


@dataclass
class RunningMock:
    """A mock serving on ``host``:``port``; ``close()`` stops it (idempotent)."""

    mock: MockRemote
    runner: web.AppRunner
    host: str
    port: int
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def base_url(self) -> str:
        """The API base URL to configure a client with, e.g. ``http://127.0.0.1:8080/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def close(self) -> None:
        """Stop serving; held (hanging) requests are dropped at once."""
        if self._closed:
            return
        self._closed = True
        await self.runner.cleanup()


async def start_mock(options: MockOptions, host: str = "127.0.0.1", port: int = 0) -> RunningMock:
    """Start a mock on ``host``:``port`` (0 = ephemeral) and return it running.

    With port 0, give a literal address: a name resolving to several addresses would get a
    different ephemeral port on each.
    """
    mock = MockRemote(options)
    # handler_cancellation: a client that gives up on a held request frees its handler.
    # No access log: it would print ?api_key=... query strings; the debug log replaces it.
    runner = web.AppRunner(
        mock.app(),
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        handler_cancellation=True,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return RunningMock(mock=mock, runner=runner, host=host, port=bound_port)


async def serve_mock(options: MockOptions, host: str, port: int, *, event_loop: str = "") -> None:
    """Serve a mock until SIGTERM or SIGINT, announcing its URL on one stdout line.

    ``event_loop`` (which loop runs, as the command line chose it) goes on a second line: the
    first stays the one that scripts wait for.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    running = await start_mock(options, host, port)
    installed: list[signal.Signals] = []
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        print(f"mock-remote listening on {running.base_url}", flush=True)
        if event_loop:
            print(f"mock-remote event loop: {event_loop}", flush=True)
        # Unbounded on purpose: serving until told to stop is the job.
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await running.close()
