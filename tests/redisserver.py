"""A real `redis-server` for the fleet tests, on a free loopback port, with its own directory.

Started per test (it takes a few milliseconds): the fault tests stop, freeze and restart it on
the same data directory, which a shared server could not survive. AOF is on, fsynced every
write, as the fleet's docs ask of a production server.

A test that needs Redis and cannot have it fails, saying how to install it: `make test` and
.ci/run install Debian's `redis-server` when they run as root, so a missing server is a broken
machine, never a reason to skip. A Sentinel group is here too; a Cluster is in rediscluster.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# A Sentinel noticing a replica, or finishing a failover.
SENTINEL_WAIT_S = 30.0


def redis_server_path() -> str:
    """redis-server's path, or the test fails saying how to get it."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: `apt-get install redis-server` (Debian's Redis 7); "
            "`make test` and .ci/run install it when run as root"
        )
    return path


# Ports handed out lately: a cluster picks a dozen before any node listens, and the kernel may
# give a port just closed again, so one port could go to two nodes (one fails to start).
_HANDED: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, and not handed out lately."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED:
            _HANDED.append(port)
            return port
    raise RuntimeError("no free loopback port that was not handed out lately")


async def terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM (Redis finishes its AOF), then SIGKILL after a bounded wait."""
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)


class RedisServer:
    """One `redis-server` process over a data directory that outlives its restarts."""

    def __init__(
        self, directory: Path, *, password: str = "", extra_args: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        self.password = password
        # e.g. ("--replicaof", HOST, PORT) for a replica (the Sentinel tests).
        self.extra_args = extra_args
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
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        argv += self.extra_args
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
        await terminate(process)

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


def fleet_config_file(directory: Path, server: RedisServer, *, prefix: str, partitions: int) -> str:
    """A config file for `forwarder` commands: queue.mode "fleet" on `server`; its path."""
    path = directory / "forwarder.toml"
    path.write_text(
        f'[queue]\nmode = "fleet"\n[state]\ndir = "{directory / "state"}"\n'
        f'[fleet]\nredis_url = "{server.url}"\nkey_prefix = "{prefix}"\n'
        f"partitions = {partitions}\n",
        encoding="utf-8",
    )
    return str(path)


SENTINEL_SERVICE = "fwdmaster"


async def sentinel_command(client: aioredis.Redis, *args: str) -> Any:
    """`SENTINEL ARGS...`, its reply as the server sent it."""
    return await client.execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]


class SentinelGroup:
    """A master, one replica and one Sentinel watching them (quorum 1), in one directory; the
    Sentinel with a `requirepass` of its own when `sentinel_password` is given.

    `url` is the `redis+sentinel://` address a forwarder is configured with; `failover` kills
    the master and has the Sentinel promote the replica.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str = "",
        tls: tuple[Path, Path, Path] | None = None,
        sentinel_password: str = "",
    ) -> None:
        self.directory = directory
        # The Sentinel's own `requirepass` (the data nodes' is `password`).
        self.sentinel_password = sentinel_password
        for name in ("master", "replica", "sentinel"):
            (directory / name).mkdir()
        # With `tls` (CA, certificate, key): every process also listens with TLS on a second
        # port and they talk to each other over TLS; the plain ports are the test's own checks.
        self.tls = tls
        self.tls_ports = {name: free_port() for name in ("master", "replica", "sentinel")}
        # Replicas sync at once (not after Redis's 5 s wait for more of them), and a stop
        # does not wait for replicas to catch up: both would only slow the tests.
        quick = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0")
        self.master = RedisServer(
            directory / "master", password=password, extra_args=(*quick, *self._tls("master"))
        )
        master_port = self.tls_ports["master"] if tls else self.master.port
        self.replica = RedisServer(
            directory / "replica",
            password=password,
            extra_args=(
                *quick,
                *self._tls("replica"),
                *("--replicaof", "127.0.0.1", str(master_port)),
            ),
        )
        self.password = password
        self.sentinel_port = free_port()
        self.sentinel: asyncio.subprocess.Process | None = None

    def _tls(self, name: str) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        ca, cert, key = self.tls
        return (
            "--tls-port", str(self.tls_ports[name]),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        )  # fmt: skip

    @property
    def url(self) -> str:
        """The Sentinel URL of the master (the password, if any, comes separately)."""
        if self.tls:
            port = self.tls_ports["sentinel"]
            return f"rediss+sentinel://127.0.0.1:{port}/{SENTINEL_SERVICE}/0"
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SENTINEL_SERVICE}/0"

    def sentinel_client(self) -> aioredis.Redis:
        """A client of the Sentinel itself (close it with `aclose`)."""
        return aioredis.Redis(
            host="127.0.0.1",
            port=self.sentinel_port,
            password=self.sentinel_password or None,
            socket_timeout=5.0,
            decode_responses=True,
        )

    async def start(self) -> None:
        """Start the master, the replica and the Sentinel; wait until the Sentinel knows both."""
        await self.master.start()
        await self.replica.start()
        config = self.directory / "sentinel" / "sentinel.conf"
        master_port = self.tls_ports["master"] if self.tls else self.master.port
        lines = [
            f"port {self.sentinel_port}",
            "bind 127.0.0.1",
            f"dir {self.directory / 'sentinel'}",
            f"logfile {self.directory / 'sentinel' / 'sentinel.log'}",
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} 1",
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} 1000",
            f"sentinel failover-timeout {SENTINEL_SERVICE} 10000",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {SENTINEL_SERVICE} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")
        args = self._tls("sentinel")
        lines += [f"{args[i][2:]} {args[i + 1]}" for i in range(0, len(args), 2)]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.sentinel = await asyncio.create_subprocess_exec(
            redis_server_path(), str(config), "--sentinel", stdin=asyncio.subprocess.DEVNULL
        )
        await self._until("the Sentinel sees the replica", self._replica_known)

    async def failover(self) -> None:
        """The master crashes (SIGKILL) and `SENTINEL FAILOVER` promotes the replica; returns
        once the replica serves as the master. (With the old master alive, it would take writes
        until the Sentinel's next 10 s look turns it into a replica, and lose them.)"""
        await self.master.kill()
        client = self.sentinel_client()
        try:
            await sentinel_command(client, "FAILOVER", SENTINEL_SERVICE)
        finally:
            await client.aclose()
        await self._until("the replica is promoted", self._promoted)

    async def _replica_known(self) -> bool:
        client = self.sentinel_client()
        try:
            replicas = await sentinel_command(client, "REPLICAS", SENTINEL_SERVICE)
        finally:
            await client.aclose()
        for replica in replicas:
            # A map under RESP3, a flat list of names and values under RESP2.
            fields = (
                replica
                if isinstance(replica, dict)
                else dict(zip(*[iter(replica)] * 2, strict=True))
            )
            if fields.get("flags") == "slave" and fields.get("master-link-status") == "ok":
                return True
        return False

    async def _promoted(self) -> bool:
        client = self.sentinel_client()
        try:
            _host, port = await sentinel_command(
                client, "GET-MASTER-ADDR-BY-NAME", SENTINEL_SERVICE
            )
        finally:
            await client.aclose()
        if int(port) not in (self.replica.port, self.tls_ports["replica"]):
            return False
        replica = self.replica.client()
        try:
            return bool((await replica.info("replication"))["role"] == "master")
        finally:
            await replica.aclose()

    async def _until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = asyncio.get_running_loop().time() + SENTINEL_WAIT_S
        while True:
            if self.sentinel is not None and self.sentinel.returncode is not None:
                log = (self.directory / "sentinel" / "sentinel.log").read_text(errors="replace")
                pytest.fail(f"redis-server --sentinel exited: {log[-2000:]}")
            with contextlib.suppress(OSError, aioredis.ConnectionError):
                if await check():
                    return
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"not within {SENTINEL_WAIT_S} s: {what}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop the Sentinel, the replica and the master."""
        process, self.sentinel = self.sentinel, None
        if process is not None and process.returncode is None:
            await terminate(process)
        await self.replica.stop()
        await self.master.stop()


@contextlib.asynccontextmanager
async def running_sentinel(
    *,
    password: str = "",
    tls: tuple[Path, Path, Path] | None = None,
    sentinel_password: str = "",
) -> AsyncIterator[SentinelGroup]:
    """A started `SentinelGroup` in a temporary directory, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fwd-sentinel-") as tmp:
        group = SentinelGroup(
            Path(tmp), password=password, tls=tls, sentinel_password=sentinel_password
        )
        try:
            await group.start()
            yield group
        finally:
            await group.stop()
