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


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


# A cluster forming, a replica syncing, a failover finishing (node timeout 1 s).
CLUSTER_WAIT_S = 30.0
CLUSTER_NODE_TIMEOUT_MS = 1000


def key_slot(key: str | bytes) -> int:
    """The hash slot of `key` (CRC16 of its hash tag, as Redis computes it)."""
    from redis.crc import key_slot as crc_slot

    return int(crc_slot(key.encode() if isinstance(key, str) else key))


class RedisClusterGroup:
    """A Redis Cluster: 3 primaries and 3 replicas on loopback, each in its own directory.

    Every node has AOF on (fsync always) and a short `cluster-node-timeout`, so a dead primary
    is failed over in about two seconds. Its bus port is Redis 7's `cluster-port`, a free port
    of its own (no +10000 guess). `url` is the `redis+cluster://` address a forwarder is
    configured with (two startup nodes: the client learns the rest).

    With `password`, every node has it as `requirepass` and `masterauth`. With `tls` (CA,
    certificate, key), every node also listens with TLS on a second port (`tls_ports`), the
    cluster bus and replication speak TLS only, and `url` is `rediss+cluster://` on the TLS
    ports; a node answers a TLS client with the TLS ports of the others, a plain one with
    their plain ports, which stay for the test's own checks (`RedisServer.client`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str = "",
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.directory = directory
        self.password = password
        self.tls = tls
        quick = ("--repl-diskless-sync-delay", "0", "--shutdown-timeout", "0")
        self.nodes: list[RedisServer] = []
        # A node's TLS port, by its plain port (empty without `tls`).
        self.tls_ports: dict[int, int] = {}
        for i in range(6):
            node_dir = directory / f"node{i}"
            node_dir.mkdir()
            tls_port = free_port() if tls is not None else 0
            node = RedisServer(
                node_dir,
                password=password,
                extra_args=(
                    *quick,
                    *("--cluster-enabled", "yes"),
                    *("--cluster-config-file", str(node_dir / "nodes.conf")),
                    *("--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)),
                    *("--cluster-port", str(free_port())),
                    # A replica is in CLUSTER SLOTS (what clients learn nodes from) only
                    # once its replication offset moved: pinged every second, not 10.
                    *("--repl-ping-replica-period", "1"),
                    *self._tls(tls_port),
                ),
            )
            self.nodes.append(node)
            if tls is not None:
                self.tls_ports[node.port] = tls_port

    def _tls(self, port: int) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        ca, cert, key = self.tls
        return (
            "--tls-port", str(port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
            "--tls-replication", "yes",
            "--tls-cluster", "yes",
        )  # fmt: skip

    def client_ports(self) -> list[int]:
        """The ports a forwarder talks to: the TLS ports with `tls`, else the plain ones."""
        if self.tls is None:
            return [n.port for n in self.nodes]
        return [self.tls_ports[n.port] for n in self.nodes]

    @property
    def url(self) -> str:
        """The cluster's URL: two startup nodes (the password, if any, comes separately)."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in self.client_ports()[:2])

    def node(self, port: int) -> RedisServer:
        """The node listening on `port`."""
        return next(n for n in self.nodes if n.port == port)

    async def start(self) -> None:
        """Start the six nodes, create the cluster, wait until every node says it is ok and
        every replica is in sync with its primary."""
        await asyncio.gather(*(n.start() for n in self.nodes))
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed: `apt-get install redis-tools` (Redis 7)")
        # Over TLS with `tls`: the nodes meet on the addresses given, so on their TLS ports.
        addresses = [f"127.0.0.1:{p}" for p in self.client_ports()]
        options: list[str] = []
        if self.tls is not None:
            options += ["--tls", "--cacert", str(self.tls[0])]
        if self.password:
            options += ["-a", self.password, "--no-auth-warning"]
        create = await asyncio.create_subprocess_exec(
            cli, *options, "--cluster", "create", *addresses,
            "--cluster-replicas", "1", "--cluster-yes",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(create.communicate(), CLUSTER_WAIT_S)
        except TimeoutError:
            create.kill()
            await create.wait()
            pytest.fail(f"redis-cli --cluster create did not end within {CLUSTER_WAIT_S} s")
        if create.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {out.decode(errors='replace')}")
        await self.until("the cluster is formed", self.healthy)

    async def healthy(self) -> bool:
        """Every live node says cluster_state:ok and lists every live node in its slot map
        (gossip has told it who replicates whom), and every live replica's link to its primary
        is up."""
        live = {n.port for n in self.nodes if n.process is not None}
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                ranges = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
                if {int(n[1]) for r in ranges for n in r[2:]} != live:
                    return False
                info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
                replication = await client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
                if replication["role"] == "master" and node.port not in await self.primaries():
                    return False
            finally:
                await client.aclose()
        return True

    async def _any_client(self) -> aioredis.Redis:
        node = next(n for n in self.nodes if n.process is not None)
        return node.client()

    async def primaries(self) -> set[int]:
        """The ports of the primaries that serve slots (as a live node sees them)."""
        return set((await self.slot_map()).values())

    async def slot_map(self) -> dict[tuple[int, int], int]:
        """(first slot, last slot) → the port of the primary serving them."""
        client = await self._any_client()
        try:
            ranges = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()
        return {(int(r[0]), int(r[1])): int(r[2][1]) for r in ranges}

    async def primary_of(self, key: str) -> RedisServer:
        """The primary that holds `key`'s slot now."""
        slot = key_slot(key)
        for (first, last), port in (await self.slot_map()).items():
            if first <= slot <= last:
                return self.node(port)
        raise AssertionError(f"no node serves slot {slot}")

    async def replica_of(self, primary: RedisServer) -> RedisServer:
        """A live replica of `primary`."""
        for node in self.nodes:
            if node.process is None or node is primary:
                continue
            client = node.client()
            try:
                replication = await client.info("replication")
            finally:
                await client.aclose()
            # With TLS, a replica replicates from its primary's TLS port.
            ports = (primary.port, self.tls_ports.get(primary.port))
            if replication["role"] == "slave" and int(replication["master_port"]) in ports:
                return node
        raise AssertionError(f"no live replica of node {primary.port}")

    async def failover(self, replica: RedisServer) -> None:
        """`CLUSTER FAILOVER` on `replica` (its primary alive: no write is lost); returns once
        it serves its slots and the cluster is ok everywhere."""
        client = replica.client()
        try:
            await client.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()
        await self.until("the replica is promoted", lambda: self._serves(replica))
        await self.until("the cluster is ok after the failover", self.healthy)

    async def kill_primary(self, primary: RedisServer) -> RedisServer:
        """SIGKILL `primary`; returns its replica once the cluster promoted it (within the
        node timeout and an election, about two seconds)."""
        replica = await self.replica_of(primary)
        await primary.kill()
        await self.until(
            "the replica of the killed primary is promoted", lambda: self._serves(replica)
        )
        await self.until("the cluster is ok without the killed primary", self.healthy)
        return replica

    async def _serves(self, node: RedisServer) -> bool:
        return node.port in await self.primaries()

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll `check` until true, failing the test after CLUSTER_WAIT_S."""
        deadline = asyncio.get_running_loop().time() + CLUSTER_WAIT_S
        while True:
            with contextlib.suppress(OSError, aioredis.ConnectionError, aioredis.ResponseError):
                if await check():
                    return
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"not within {CLUSTER_WAIT_S} s: {what}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after a bounded wait)."""
        await asyncio.gather(*(n.stop() for n in self.nodes))


@contextlib.asynccontextmanager
async def running_cluster(
    *, password: str = "", tls: tuple[Path, Path, Path] | None = None
) -> AsyncIterator[RedisClusterGroup]:
    """A started `RedisClusterGroup` in a temporary directory, stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fwd-cluster-") as tmp:
        group = RedisClusterGroup(Path(tmp), password=password, tls=tls)
        try:
            await group.start()
            yield group
        finally:
            await group.stop()
