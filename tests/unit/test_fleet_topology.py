"""`fleet.redis_url` forms: what a Sentinel or Cluster URL parses into; the cluster client."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from forwarder.config.schema import FleetConfig
from forwarder.fleet.connection import RedisUnavailable, connect
from forwarder.fleet.topology import (
    BadRedisUrl,
    ClusterTarget,
    SentinelTarget,
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
)
from forwarder.ops.credentials import Secret


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://10.0.0.1:26380,s2.internal,[::1]:26381/fwd/3")
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("s2.internal", 26379), ("::1", 26381)),
        service="fwd",
        db=3,
        tls=False,
    )


def test_an_acl_user_before_the_sentinels_is_the_data_nodes_user() -> None:
    target = parse_sentinel_url("redis+sentinel://forwarder@s1:26379,s2:26379/fwd")
    assert target.username == "forwarder"
    assert target.sentinels == (("s1", 26379), ("s2", 26379))
    assert parse_sentinel_url("redis+sentinel://s1/fwd").username is None


def test_rediss_sentinel_is_tls_and_the_database_defaults_to_0() -> None:
    target = parse_sentinel_url("REDISS+SENTINEL://s1:26379/mymaster")
    assert (target.tls, target.db, target.service) == (True, 0, "mymaster")


@pytest.mark.parametrize(
    ("url", "sentinel"),
    [
        ("redis+sentinel://s1/m", True),
        ("rediss+sentinel://s1/m", True),
        ("redis://s1:6379/0", False),
        ("redis+cluster://s1:7000", False),
        ("unix:///run/redis.sock", False),
    ],
)
def test_which_urls_go_through_sentinel(url: str, sentinel: bool) -> None:
    assert is_sentinel_url(url) is sentinel


def test_errors_never_repeat_the_value() -> None:
    secret = "pw-SECRET-123"
    for url in (
        f"redis+sentinel://u:{secret}@s1/m",
        f"redis+sentinel://{secret}:x/m",
        f"redis+sentinel://s1/{secret}/x",
        f"redis+sentinel://s1/m?{secret}",
    ):
        with pytest.raises(BadRedisUrl) as caught:
            parse_sentinel_url(url)
        assert secret not in str(caught.value)


def test_a_cluster_url_names_its_startup_nodes_the_user_and_tls() -> None:
    assert parse_cluster_url("redis+cluster://10.0.0.1:7000,r2.internal,[::1]:7001") == (
        ClusterTarget(nodes=(("10.0.0.1", 7000), ("r2.internal", 6379), ("::1", 7001)), tls=False)
    )
    target = parse_cluster_url("REDISS+CLUSTER://forwarder@r1:7000/0")
    assert (target.tls, target.username, target.nodes) == (True, "forwarder", (("r1", 7000),))
    assert is_cluster_url("rediss+cluster://r1")
    assert not is_cluster_url("redis://r1")


def test_cluster_url_errors_never_repeat_the_value() -> None:
    secret = "pw-SECRET-456"
    for url, detail in (
        (f"redis+cluster://u:{secret}@r1", "password"),
        (f"redis+cluster://:{secret}@r1", "password"),
        (f"redis+cluster://{secret}:x", "port"),
        (f"redis+cluster://r1/{secret}", "only database 0"),
        ("redis+cluster://r1/3", "only database 0"),
        (f"redis+cluster://r1?{secret}", "no query"),
        ("redis+cluster://r1,,r2", "valid host"),
    ):
        with pytest.raises(BadRedisUrl) as caught:
            parse_cluster_url(url)
        assert secret not in str(caught.value)
        assert detail in str(caught.value)


async def test_the_cluster_client_gets_the_single_server_options() -> None:
    password = "redis-pw-SECRET-cluster"
    fleet = FleetConfig(redis_url="rediss+cluster://fwd@127.0.0.1:7000,127.0.0.1:7001")
    client = connect(fleet, member="host-a", password=Secret(password))
    try:
        cluster = client.client
        kwargs = cluster.nodes_manager.connection_kwargs  # type: ignore[attr-defined]
        assert kwargs["username"] == "fwd"
        assert kwargs["password"] == password
        assert kwargs["client_name"] == "forwarder-host-a"
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.0
        assert kwargs["ssl_cert_reqs"] == "required"
        assert kwargs["ssl_check_hostname"] is True
        assert kwargs["connection_class"].__name__ == "SSLConnection"
        assert cluster.retry.get_retries() == 1  # type: ignore[attr-defined]
        nodes = cluster.startup_nodes  # type: ignore[attr-defined]
        assert [n.name for n in nodes] == ["127.0.0.1:7000", "127.0.0.1:7001"]
        assert password not in repr(client) + repr(cluster)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "error",
    [
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        MasterDownError("MASTERDOWN Link with MASTER is down"),
        TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        MovedError("3999 127.0.0.1:6381"),
        AskError("3999 127.0.0.1:6381"),
        SlotNotCoveredError("Slot 3999 not covered by the cluster"),
        RedisClusterException("Redis Cluster cannot be connected"),
    ],
)
async def test_cluster_errors_are_unavailable_never_a_refusal_or_a_crash(
    error: Exception,
) -> None:
    client = connect(FleetConfig(redis_url="redis+cluster://127.0.0.1:7000"), member="a",
                     password=None)  # fmt: skip

    async def fails() -> None:
        raise error

    try:
        with pytest.raises(RedisUnavailable) as caught:
            await client.call("budget", fails)
        assert not caught.value.refused
        assert type(error).__name__ in str(caught.value)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    ["rediss://r1:6380/0", "rediss+sentinel://s1:26379,s2:26379/fwd", "rediss+cluster://n1:7000"],
)
async def test_every_tls_connection_gets_the_client_certificate_and_the_ca(url: str) -> None:
    files = {"ssl_ca_certs": "/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key"}
    fleet = FleetConfig(
        redis_url=url, ca_bundle="/ca.pem", tls_cert_file="/c.pem", tls_key_file="/c.key"
    )
    client: Any = connect(fleet, member="host-a", password=None).client
    try:
        if url.startswith("rediss+cluster"):
            # Every node's connections, those found in the slot map too, are made with these.
            kwargs = client.nodes_manager.connection_kwargs
            made: list[tuple[dict[str, Any], type]] = [(kwargs, kwargs["connection_class"])]
        else:
            # Through Sentinel: the Sentinels' connections too, not only the data nodes'.
            clients = [client, *getattr(client, "_fleet_sentinels", ())]
            assert len(clients) == (3 if "sentinel" in url else 1)
            made = [(c.connection_pool.connection_kwargs, c.connection_pool.connection_class)
                    for c in clients]  # fmt: skip
        for kwargs, connection_class in made:
            assert {k: kwargs.get(k) for k in files} == files
            assert (kwargs["ssl_cert_reqs"], kwargs["ssl_check_hostname"]) == ("required", True)
            assert "SSL" in connection_class.__name__
    finally:
        await client.aclose()
