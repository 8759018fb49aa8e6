"""Fleet mode on a real Redis Cluster (3 primaries, 3 replicas): the start check on every node,
budgets of accounts on different primaries shared by two clients, leases, the streams, dead
letters, `fleet status` and drain. Each test forms its own cluster (about 2 s)."""

from __future__ import annotations

import functools
import time

import pytest

from forwarder.cli.fleet import read_fleet
from forwarder.config.schema import Config, FleetConfig, QueueConfig
from forwarder.events import Event
from forwarder.fleet import deadletters, queuestatus
from forwarder.fleet.budget import RedisRateBudget, SharedTicket, read_budgets
from forwarder.fleet.connection import FleetClient, RedisUnavailable, connect
from forwarder.fleet.leases import Leases
from forwarder.fleet.mode import FleetMode
from forwarder.fleet.queuekeys import GROUP, AccountKeys
from forwarder.fleet.streams import Streams, encode_event
from tests.rediscluster import RedisClusterGroup, on_node

PREFIX = "fwc"


def client_of(cluster: RedisClusterGroup, member: str) -> FleetClient:
    fleet = FleetConfig(redis_url=cluster.url, member=member, key_prefix=PREFIX)
    return connect(fleet, member=member, password=None)


async def accounts_on_distinct_primaries(cluster: RedisClusterGroup, count: int) -> list[str]:
    """Account names whose keys (`{PREFIX:NAME}`) live on `count` different primaries."""
    found: dict[int, str] = {}
    for n in range(200):
        name = f"acct{n}"
        primary = await cluster.primary_of(AccountKeys(PREFIX, name).tag)
        found.setdefault(primary.port, name)
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"no {count} accounts on distinct primaries")


def ev(n: int, account: str) -> Event:
    return Event(
        event_id=f"cl-{n:05d}", recipient_id=f"r{n % 3}", name="VIEW", account=account,
        accepted_at=time.time(),
    )  # fmt: skip


async def test_the_start_check_reads_every_node_and_names_the_one_at_fault(
    redis_cluster: RedisClusterGroup,
) -> None:
    client = client_of(redis_cluster, "host-a")
    try:
        assert await client.check_server() == []
        primary = await redis_cluster.primary_of("{x}")
        replica = await redis_cluster.replica_of(primary)
        # A replica is checked too: promoted later, it would hold the fleet's data.
        await on_node(replica, "CONFIG", "SET", "appendonly", "no")
        await on_node(primary, "CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        warnings = await client.check_server()
        assert len(warnings) == 2, warnings
        (aof,) = [w for w in warnings if "appendonly" in w]
        (policy,) = [w for w in warnings if "maxmemory-policy" in w]
        assert f"on node 127.0.0.1:{replica.port}:" in aof
        assert f"is allkeys-lru on node 127.0.0.1:{primary.port}:" in policy
        # The client connected under its name, on the node it was sent to.
        clients = await on_node(primary, "CLIENT", "LIST")
        assert b"name=forwarder-host-a" in clients
    finally:
        await client.aclose()


async def test_two_hosts_share_the_budgets_of_accounts_on_different_primaries(
    redis_cluster: RedisClusterGroup,
) -> None:
    accounts = await accounts_on_distinct_primaries(redis_cluster, 3)
    hosts = [client_of(redis_cluster, "host-a"), client_of(redis_cluster, "host-b")]
    try:
        for host in hosts:
            for account in accounts:
                budget = RedisRateBudget(account, 6000, fleet=host, mode=FleetMode())
                assert isinstance(await budget.acquire(), SharedTicket)
        for account in accounts:
            key = AccountKeys(PREFIX, account).tag + ":budget"
            primary = await redis_cluster.primary_of(key)
            # One hash per account, on the primary of its slot, counting both hosts' tokens.
            assert await on_node(primary, "EXISTS", key) == 1
            used = await on_node(primary, "HGET", key, "used")
            assert int(used) >= 2
        budgets = await read_budgets(hosts[0])
        assert sorted(budgets) == sorted(accounts)
    finally:
        for host in hosts:
            await host.aclose()


async def test_leases_streams_dead_letters_status_and_drain_work_on_a_cluster(
    redis_cluster: RedisClusterGroup,
) -> None:
    a, b = await accounts_on_distinct_primaries(redis_cluster, 2)
    fleet = client_of(redis_cluster, "host-a")
    redis = fleet.client
    try:
        leases = Leases(redis, prefix=PREFIX, member="host-a", lease_s=5.0)
        other = Leases(redis, prefix=PREFIX, member="host-b", lease_s=5.0)
        streams = Streams(redis, prefix=PREFIX, member="host-a")
        for account in (a, b):
            lease = await leases.acquire(account, 0)
            assert lease is not None
            assert lease.generation == 1
            assert await other.acquire(account, 0) is None  # held
            assert await leases.renew(lease)

            sent = [ev(n, account) for n in range(5)]
            ids = await streams.append(account, [(0, encode_event(e)) for e in sent])
            assert len(ids) == 5
            await streams.ensure_group(account, 0)
            got = await streams.read(account, 0, 10)
            assert [e.event.event_id for e in got if e.event] == [e.event_id for e in sent]
            # Another member sees them pending with host-a, and may take one over.
            taker = Streams(redis, prefix=PREFIX, member="host-b")
            assert await taker.pending_of_others(account, 0) == 5
            (claimed,) = await taker.claim_others(account, 0, 1)
            assert claimed.entry_id == got[0].entry_id
            assert await streams.settle(lease, [e.entry_id for e in got[:4]]) == 4
            assert await streams.dead_letter(lease, got[4].entry_id, {"event": "{}"})
            keys = AccountKeys(PREFIX, account)
            assert await redis.xlen(keys.stream(0)) == 0  # settled: acked and deleted
            assert await redis.xlen(keys.dead) == 1

            # Fencing: a lease that moved on settles nothing.
            assert await leases.release(lease, group=GROUP, idle_ms=1, limit=10) == 0
            taken = await other.acquire(account, 0)
            assert taken is not None
            assert taken.generation == 2
            assert await streams.settle(lease, [b"0-1"]) == -1
            assert not await leases.renew(lease)

        # Dead letters: list, replay (once, even twice asked), purge.
        event = ev(99, a)
        await redis.xadd(AccountKeys(PREFIX, a).dead, {"event": orjson_event(event)})
        letters = await deadletters.list_letters(redis, PREFIX, [a, b])
        assert len(letters) == 3
        mine = next(x for x in letters if x.event is not None)
        assert await deadletters.replay(redis, PREFIX, 1, mine)
        assert not await deadletters.replay(redis, PREFIX, 1, mine)  # gone: not put back twice
        assert await redis.xlen(AccountKeys(PREFIX, a).stream(0)) == 1
        assert await deadletters.purge(redis, PREFIX, [a, b], time.time() + 60) == 2

        # `fleet status` and drain, through the client's bounded calls.
        config = Config(queue=QueueConfig(mode="fleet"), fleet=FleetConfig(
            redis_url=redis_cluster.url, member="host-a", key_prefix=PREFIX, partitions=1,
        ))  # fmt: skip
        await fleet.call("drain", lambda: queuestatus.drain(redis, PREFIX, "host-b"))
        state = await read_fleet(config)
        queues = {q["account"]: q for q in state["queue"]["accounts"]}
        assert queues[a]["length"] == 1
        assert queues[b]["length"] == 0
        assert queues[a]["partitions"][0]["lease"] == "host-b 2"
        assert state["queue"]["drained"] == ["host-b"]
        assert await fleet.call("undrain", lambda: queuestatus.undrain(redis, PREFIX, "host-b"))
    finally:
        await fleet.aclose()


def orjson_event(event: Event) -> bytes:
    import orjson

    return orjson.dumps(event.to_dict())


async def test_a_cluster_that_is_down_is_unavailable_not_a_refusal_nor_a_crash(
    redis_cluster: RedisClusterGroup,
) -> None:
    lost, alive = await accounts_on_distinct_primaries(redis_cluster, 2)
    fleet = client_of(redis_cluster, "host-a")
    try:
        for account in (lost, alive):
            budget = RedisRateBudget(account, 6000, fleet=fleet, mode=FleetMode())
            assert isinstance(await budget.acquire(), SharedTicket)
        primary = await redis_cluster.primary_of(AccountKeys(PREFIX, lost).tag)
        replica = await redis_cluster.replica_of(primary)
        await replica.kill()
        await primary.kill()
        witness = next(n for n in redis_cluster.nodes if n.process is not None)

        async def down() -> bool:
            return b"cluster_state:fail" in await on_node(witness, "CLUSTER", "INFO")

        await redis_cluster.until("the cluster says it is down", down)
        # A slot with no node left: its node refuses connections. A slot whose primary is
        # alive: CLUSTERDOWN (the whole cluster stops serving when one slot is lost). Both
        # are "unavailable", within the call's bound: the host falls back.
        for account, error in ((lost, ""), (alive, "ClusterDownError")):
            key = AccountKeys(PREFIX, account).tag + ":budget"
            with pytest.raises(RedisUnavailable) as caught:
                await fleet.call("budget_read", functools.partial(fleet.client.hgetall, key))
            assert not caught.value.refused
            assert error in str(caught.value)
    finally:
        await fleet.aclose()
