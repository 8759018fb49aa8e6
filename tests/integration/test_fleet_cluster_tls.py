"""Fleet mode on a Redis Cluster with TLS and an ACL user's password, as production runs it.

One cluster (3 primaries, 3 replicas; about 2.5 s to form) whose nodes speak TLS to clients,
on the cluster bus and for replication, and ask for a password. The host connects as the
daemon does (`FleetHost.start`: the password read from `fleet.redis_password_file`), through a
`rediss+cluster://USER@...` URL naming two startup nodes: every other node is found in the slot
map, and must be reached with the same TLS verification and the same login.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from forwarder.config.schema import Config, FleetConfig
from forwarder.fleet.budget import RedisRateBudget, SharedTicket
from forwarder.fleet.connection import FleetClient, RedisUnavailable, failure_kind
from forwarder.fleet.host import FleetHost
from forwarder.fleet.leases import Leases
from forwarder.fleet.mode import FleetMode
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.fleet.streams import Streams, encode_event
from tests.conftest import TlsFiles
from tests.integration.test_fleet_cluster import PREFIX, accounts_on_distinct_primaries, ev
from tests.rediscluster import RedisClusterGroup, on_node, running_cluster
from tests.redisserver import RedisServer

PASSWORD = "redis-pw-SECRET-cluster-tls-3f2e1d0c"
WRONG = "wrong-pw-SECRET-cluster-9a8b7c6d5e"
USER = "fwduser"


def config_of(url: str, password_file: Path) -> Config:
    return Config(
        fleet=FleetConfig(
            redis_url=url,
            member="host-a",
            key_prefix=PREFIX,
            redis_password_file=str(password_file),
        )
    )


async def start_host(
    url: str, password_file: Path
) -> tuple[FleetHost, list[MutableMapping[str, Any]]]:
    """`FleetHost.start` as the daemon calls it, with the log lines it wrote."""
    with structlog.testing.capture_logs() as logs:
        host = await FleetHost.start(config_of(url, password_file), in_delivery=lambda: 0)
    return host, logs


async def host_connections(node: RedisServer) -> list[dict[str, str]]:
    """The fields of the connections `host-a` holds to `node` (CLIENT LIST)."""
    listing = (await on_node(node, "CLIENT", "LIST")).decode()
    clients = [dict(f.split("=", 1) for f in line.split()) for line in listing.splitlines()]
    return [c for c in clients if c.get("name") == "forwarder-host-a"]


async def append_read_settle(client: FleetClient, account: str) -> None:
    """Hold a partition of `account`, append events, read them back and settle them."""
    redis = client.client
    lease = await Leases(redis, prefix=PREFIX, member="host-a", lease_s=5.0).acquire(account, 0)
    assert lease is not None
    streams = Streams(redis, prefix=PREFIX, member="host-a")
    sent = [ev(n, account) for n in range(3)]
    assert len(await streams.append(account, [(0, encode_event(e)) for e in sent])) == 3
    await streams.ensure_group(account, 0)
    got = await streams.read(account, 0, 10)
    assert [e.event.event_id for e in got if e.event] == [e.event_id for e in sent]
    assert await streams.settle(lease, [e.entry_id for e in got]) == 3
    assert await redis.xlen(AccountKeys(PREFIX, account).stream(0)) == 0


async def test_rediss_cluster_with_a_user_and_password_file_verifies_and_logs_in_to_every_node(
    tls_files: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The system trust store, as in production, made to hold the test CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(PASSWORD + "\n", encoding="utf-8")
    wrong.write_text(WRONG + "\n", encoding="utf-8")
    tls = (tls_files.ca, tls_files.cert, tls_files.key)
    async with running_cluster(password=PASSWORD, tls=tls) as cluster:
        # An ACL user of its own on every node (ACLs are per node, not shared by the cluster).
        for node in cluster.nodes:
            await on_node(node, "ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
        url = cluster.url.replace("rediss+cluster://", f"rediss+cluster://{USER}@")
        assert url.count(",") == 1  # two startup nodes: the other four are discovered

        host, logs = await start_host(url, right)
        try:
            assert host.mode.name == "fleet", logs
            # The start check read every node: one that did not answer would be a warning.
            assert [r for r in logs if r["event"] == "fleet_redis_settings"] == []
            client = host.client
            cluster_client: Any = client.client
            assert sorted(n.port for n in cluster_client.get_nodes()) == sorted(
                cluster.client_ports()
            )
            await check_every_node_over_tls_as_the_user(cluster, client)
            await use_accounts_on_different_primaries(cluster, client)
            shown = repr(client) + repr(cluster_client) + repr(host.view())
            shown += repr(cluster_client.get_nodes()) + repr(logs)
            assert PASSWORD not in shown
            assert host.secrets() == [PASSWORD]  # handed to the log redactor
        finally:
            await host.stop()

        # A wrong password, then a CA the system does not trust: no node lets the host in, it
        # starts in fallback (as with Redis down), each call is unavailable (not a refusal)
        # naming the cause, as the single-server client does, and nothing holds a secret.
        wrong_login, shown = await refused_start(url, wrong)
        assert "AuthenticationError" in wrong_login
        monkeypatch.delenv("SSL_CERT_FILE")
        unverified, more = await refused_start(url, right)
        assert "SSLCertVerificationError" in unverified
        for secret in (PASSWORD, WRONG):
            assert secret not in wrong_login + unverified + shown + more


async def refused_start(url: str, password_file: Path) -> tuple[str, str]:
    """Start a host that the cluster does not let in: the error of a call, the logs (reprs)."""
    host, logs = await start_host(url, password_file)
    try:
        assert host.mode.name == "fallback"
        with pytest.raises(RedisUnavailable) as caught:
            await host.client.call("ping", host.client.client.ping)
        assert not caught.value.refused
        return str(caught.value), repr(logs) + repr(host.client.client)
    finally:
        await host.stop()


async def check_every_node_over_tls_as_the_user(
    cluster: RedisClusterGroup, client: FleetClient
) -> None:
    """Every node, replicas too, holds the host's connection on its TLS port, logged in as the
    URL's user (a replica only got the start check's CONFIG GET)."""
    for node in cluster.nodes:
        connections = await host_connections(node)
        assert connections, f"no connection to node {node.port}"
        for connection in connections:
            assert connection["laddr"] == f"127.0.0.1:{cluster.tls_ports[node.port]}"
            assert connection["user"] == USER
    # The start check's warning names a node by the address the client reaches it on.
    replica = await cluster.replica_of(await cluster.primary_of("{x}"))
    await on_node(replica, "CONFIG", "SET", "appendonly", "no")
    (warning,) = await client.check_server()
    assert f"appendonly is not yes on node 127.0.0.1:{cluster.tls_ports[replica.port]}:" in (
        warning
    )


async def use_accounts_on_different_primaries(
    cluster: RedisClusterGroup, client: FleetClient
) -> None:
    """Budget tokens, and a partition's append, read and settle, for accounts on different
    primaries: the client reaches each primary it learnt of, with TLS and the login."""
    accounts = await accounts_on_distinct_primaries(cluster, 3)
    for account in accounts:
        budget = RedisRateBudget(account, 6000, fleet=client, mode=FleetMode())
        assert isinstance(await budget.acquire(), SharedTicket)
        key = AccountKeys(PREFIX, account).tag + ":budget"
        primary = await cluster.primary_of(key)
        assert await on_node(primary, "EXISTS", key) == 1
        await append_read_settle(client, account)


def test_a_failure_names_the_types_of_its_causes_never_their_text() -> None:
    def chained(*errors: BaseException) -> BaseException:
        for cause, error in itertools.pairwise(errors[::-1]):
            error.__cause__ = cause
        return errors[0]

    wrapped = chained(
        RedisClusterException(f"cannot be connected: {PASSWORD}"),
        RedisConnectionError(f"Error connecting: {PASSWORD}"),
        ssl.SSLCertVerificationError(PASSWORD),
    )
    assert failure_kind(wrapped) == (
        "RedisClusterException (ConnectionError, SSLCertVerificationError)"
    )
    assert failure_kind(RedisConnectionError(PASSWORD)) == "ConnectionError"
    # redis-py's TimeoutError for the built-in one, which a cancellation caused: said once.
    timeout = chained(RedisTimeoutError("Timeout"), TimeoutError(), asyncio.CancelledError())
    assert failure_kind(timeout) == "TimeoutError"
    # Only a few levels: the first cause is what an operator acts on.
    deep = chained(*(OSError(str(n)) if n % 2 else ValueError(str(n)) for n in range(9)))
    assert failure_kind(deep) == "ValueError (OSError, ValueError, OSError)"
