"""Where the fleet's Redis is: one endpoint, a Sentinel-watched master or a Cluster; its client.

`fleet.redis_url` names one endpoint (`redis://`, `rediss://`, `unix://`, read by redis-py's
`from_url`), a master found through Sentinel, or a Redis Cluster:

    redis+sentinel://[USER@]HOST[:PORT][,HOST[:PORT]...]/MASTERNAME[/DB]
    rediss+sentinel://...      (TLS to the Sentinels and to the data nodes)
    redis+cluster://[USER@]HOST[:PORT][,HOST[:PORT]...]
    rediss+cluster://...       (TLS to every node, verified like rediss://)

`parse_sentinel_url` checks that form strictly (the config check calls it; its errors never
repeat the value, which may hold a pasted secret) and `build_client` makes the process's
client: `redis.asyncio.sentinel.Sentinel(...).master_for(MASTERNAME)`, whose pool asks the
Sentinels for the master's address on each new connection, so after a failover the next
connection reaches the promoted replica. The data nodes get the fleet's password (and the ACL
USER, if one is given); the Sentinels get their own password, if one is configured
(`fleet.sentinel_password_file` or the credential `sentinel_password`: Sentinel's
`requirepass`) — see docs/how-to/fleet.md.

A cluster's addresses are startup nodes only: `redis.asyncio.cluster.RedisCluster` asks them
for the slot map, talks to each primary directly, and follows MOVED / a failover by reading the
map again. It gets the same timeouts, retry, password, ACL user, TLS and client name as the
single-server client. A cluster has only database 0, so a URL names no other. Every script and
every multi-key command of the fleet keeps to one hash slot (an account's keys share the tag
`{PREFIX:ACCOUNT}`, the queue's consumers `{PREFIX}`), which is what a cluster requires.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import redis.asyncio as aioredis

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_SCHEMES = ("rediss", "rediss+sentinel", "rediss+cluster")
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_CLUSTER_PORT = 6379
MAX_DB = 15


class BadRedisUrl(ValueError):
    """`fleet.redis_url` is not a URL fleet mode can use; the text never repeats the value."""


@dataclass(frozen=True)
class SentinelTarget:
    """A master found through Sentinel: the Sentinels, the master's name, the database."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool
    # The data nodes' ACL user (`USER@` before the Sentinels); None: the default user.
    username: str | None = None


@dataclass(frozen=True)
class ClusterTarget:
    """A Redis Cluster: the startup nodes, TLS or not, the ACL user."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    username: str | None = None  # None: the default user


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ("" if it has none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names a master through Sentinel."""
    return scheme_of(url) in SENTINEL_SCHEMES


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster."""
    return scheme_of(url) in CLUSTER_SCHEMES


def _split_url(url: str, schemes: tuple[str, ...], kind: str) -> tuple[str, str, str, str]:
    """(scheme, ACL user or "", hosts, path) of a Sentinel or Cluster URL; `BadRedisUrl` if its
    scheme is not one of `schemes`, it has a query or a fragment, or a password is in it."""
    scheme = scheme_of(url)
    if scheme not in schemes:
        raise BadRedisUrl(f"must start with {' or '.join(s + '://' for s in schemes)}")
    rest = url.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise BadRedisUrl(f"a {kind} URL takes no query or fragment; the value is not shown")
    netloc, _, path = rest.partition("/")
    username, at, hosts = netloc.rpartition("@")
    if at and (":" in username or not _USER_RE.fullmatch(username)):
        raise BadRedisUrl(
            "must not hold a password (it would be logged with the URL); put it in "
            "fleet.redis_password_file or the systemd credential redis_password; only an ACL "
            "user may come before @; the value is not shown"
        )
    return scheme, username, hosts, path


def parse_cluster_url(url: str) -> ClusterTarget:
    """The target of a `redis+cluster://` URL; `BadRedisUrl` saying what is wrong."""
    scheme, username, hosts, path = _split_url(url, CLUSTER_SCHEMES, "Cluster")
    nodes = tuple(_address(part, DEFAULT_CLUSTER_PORT, "node") for part in hosts.split(","))
    if path not in ("", "0"):
        raise BadRedisUrl(
            "a Redis Cluster has only database 0: after the nodes only /0 may follow: "
            "redis+cluster://HOST:PORT[,HOST:PORT...]"
        )
    return ClusterTarget(nodes, scheme == "rediss+cluster", username or None)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The target of a `redis+sentinel://` URL; `BadRedisUrl` saying what is wrong."""
    scheme, username, hosts, path = _split_url(url, SENTINEL_SCHEMES, "Sentinel")
    sentinels = tuple(_address(p, DEFAULT_SENTINEL_PORT, "Sentinel") for p in hosts.split(","))
    names = path.split("/") if path else []
    if not names or not _SERVICE_RE.fullmatch(names[0]):
        raise BadRedisUrl(
            "needs the master's name after the Sentinel addresses: "
            "redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTERNAME[/DB]"
        )
    if len(names) > 2 or (len(names) == 2 and not names[1].isdigit()):
        raise BadRedisUrl("after the master's name only a database number (0 to 15) may follow")
    db = int(names[1]) if len(names) == 2 else 0
    if db > MAX_DB:
        raise BadRedisUrl(f"the database number must be 0 to {MAX_DB}")
    return SentinelTarget(sentinels, names[0], db, scheme == "rediss+sentinel", username or None)


def _address(part: str, default_port: int, what: str) -> tuple[str, int]:
    host, port = part, str(default_port)
    if ":" in part and not part.endswith("]"):
        host, _, port = part.rpartition(":")
    if not _HOST_RE.fullmatch(host):
        raise BadRedisUrl(f"names a {what} without a valid host; the value is not shown")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRedisUrl(f"names a {what} port that is not 1 to 65535; the value is not shown")
    return host.strip("[]"), int(port)


def build_client(
    module: Any, url: str, options: dict[str, Any], *, sentinel_password: str | None = None
) -> aioredis.Redis:
    """The process's client for `url` with the connection `options` (timeouts, retry, TLS,
    password): `from_url` for one endpoint, the cluster client, or the Sentinel-managed master
    (the Sentinels asked with `sentinel_password`, if given)."""
    if is_cluster_url(url):
        return _cluster_client(url, options)
    if not is_sentinel_url(url):
        return cast("aioredis.Redis", module.Redis.from_url(url, **options))
    from redis.asyncio.sentinel import Sentinel

    target = parse_sentinel_url(url)
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    if target.tls:
        tls["ssl"] = True
    # The Sentinels: same timeouts, retries and TLS; their own password, not the data nodes'.
    sentinel_options = {
        k: v
        for k, v in options.items()
        if k.startswith("socket_") or k in ("retry", "retry_on_error", "health_check_interval")
    }
    if sentinel_password is not None:
        sentinel_options["password"] = sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # (untyped upstream)
        list(target.sentinels), sentinel_kwargs={**sentinel_options, **tls}, **{**options, **tls}
    )
    master_class = _closing_master_class(module)
    user: dict[str, Any] = {"username": target.username} if target.username else {}
    master = sentinel.master_for(target.service, redis_class=master_class, db=target.db, **user)
    master._fleet_sentinels = sentinel.sentinels
    return cast("aioredis.Redis", master)


def _closing_master_class(module: Any) -> Any:
    class SentinelMaster(module.Redis):  # type: ignore[misc]
        """The master's client; closing it closes the Sentinel connections too."""

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            await super().aclose(close_connection_pool)
            for client in getattr(self, "_fleet_sentinels", ()):
                await client.aclose()

    return SentinelMaster


def _cluster_client(url: str, options: dict[str, Any]) -> aioredis.Redis:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    target = parse_cluster_url(url)
    extra: dict[str, Any] = {"ssl": True} if target.tls else {}
    if target.username:
        extra["username"] = target.username
    # `retry` is the cluster client's own (a refused node, MOVED, CLUSTERDOWN: the slot map is
    # read again and the command sent once more); `max_connections` is per node.
    client = _closing_cluster_class(RedisCluster)(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        **{**options, **extra},
    )
    # It answers every command the fleet sends as `Redis` does (keys route to their slot).
    return cast("aioredis.Redis", client)


def _closing_cluster_class(base: Any) -> Any:
    class FleetCluster(base):  # type: ignore[misc]
        """The cluster client; closing it closes every node's connections, always."""

        async def aclose(self) -> None:
            await super().aclose()
            # redis-py's `aclose` does nothing once a connection error marked the slot map
            # for a re-read, leaving the nodes' sockets open: close them here in any case.
            await self.nodes_manager.aclose()
            await self.nodes_manager.aclose("startup_nodes")

    return FleetCluster


def is_cluster_client(client: object) -> bool:
    """Whether `client` is redis-py's cluster client (per-node calls: the start check)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)
