"""A real Redis Cluster for the fleet tests: 3 primaries and 3 replicas of `redis-server` on
loopback, each a `RedisServer` (redisserver.py) in its own directory, formed with
`redis-cli --cluster create`; optionally with a password and TLS. Started per test (about 2.5
s): the failover tests kill and promote nodes, which a shared cluster could not survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.redisserver import RedisServer, free_port

# A cluster forming, a replica syncing, a failover finishing (node timeout 1 s).
CLUSTER_WAIT_S = 30.0
CLUSTER_NODE_TIMEOUT_MS = 1000


async def on_node(node: RedisServer, *command: Any) -> Any:
    """A command on one node directly, on its plain port (the test's own view, not through a
    cluster client)."""
    client = node.client()
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


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
