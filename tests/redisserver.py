"""A real `redis-server` for the fleet tests, on a free loopback port, with its own directory.

Started per test (it takes a few milliseconds): the fault tests stop, freeze and restart it on
the same data directory, which a shared server could not survive. AOF is on, fsynced every
write, as the fleet's docs ask of a production server.

A test that needs Redis and cannot have it fails, saying how to install it: `make test` and
.ci/run install Debian's `redis-server` when they run as root, so a missing server is a broken
machine, never a reason to skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def redis_server_path() -> str:
    """redis-server's path, or the test fails saying how to get it."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (Debian's Redis 7); "
            "`make test` and .ci/run install it when run as root"
        )
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One `redis-server` process over a data directory that outlives its restarts."""

    def __init__(self, directory: Path, *, password: str = "") -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The URL a forwarder is configured with (the password, if any, comes separately)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> aioredis.Redis:
        """A client for the test's own checks (close it with `aclose`)."""
        return aioredis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password or None,
            socket_timeout=5.0,
            decode_responses=False,
        )

    async def start(self) -> None:
        """Start (or restart) the server on the same port and data directory; wait for PING."""
        argv = [
            redis_server_path(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self.process.returncode is not None:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"redis-server exited with {self.process.returncode}: {log}")
                not_yet = (OSError, aioredis.ConnectionError, aioredis.BusyLoadingError)
                with contextlib.suppress(*not_yet):
                    if await client.ping():
                        return
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT_S} s")
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """SIGTERM (Redis finishes its AOF), then SIGKILL after a bounded wait."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        self.resume(process)
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)

    async def kill(self) -> None:
        """SIGKILL, as a crash: what the AOF has fsynced is all that survives."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)

    def freeze(self) -> None:
        """SIGSTOP: the server holds every connection and answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self, process: asyncio.subprocess.Process | None = None) -> None:
        """SIGCONT after `freeze` (harmless otherwise)."""
        target = process or self.process
        if target is not None and target.returncode is None:
            os.kill(target.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def running_redis(*, password: str = "") -> AsyncIterator[RedisServer]:
    """A started `RedisServer` in a temporary directory, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fwd-redis-") as tmp:
        server = RedisServer(Path(tmp), password=password)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
