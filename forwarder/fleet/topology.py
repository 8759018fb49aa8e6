"""Where the fleet's Redis is: one endpoint or a Sentinel-watched master; the client for it.

`fleet.redis_url` names either one endpoint (`redis://`, `rediss://`, `unix://`, read by
redis-py's `from_url`) or a master found through Sentinel:

    redis+sentinel://[USER@]HOST[:PORT][,HOST[:PORT]...]/MASTERNAME[/DB]
    rediss+sentinel://...      (TLS to the Sentinels and to the data nodes)

`parse_sentinel_url` checks that form strictly (the config check calls it; its errors never
repeat the value, which may hold a pasted secret) and `build_client` makes the process's
client: `redis.asyncio.sentinel.Sentinel(...).master_for(MASTERNAME)`, whose pool asks the
Sentinels for the master's address on each new connection, so after a failover the next
connection reaches the promoted replica. The data nodes get the fleet's password (and the ACL
USER, if one is given); the Sentinels get their own password, if one is configured
(`fleet.sentinel_password_file` or the credential `sentinel_password`: Sentinel's
`requirepass`) — see docs/how-to/fleet.md.

Redis Cluster (`redis+cluster://`) is refused at config time: see `CLUSTER_REFUSAL`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import redis.asyncio as aioredis

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_REFUSAL = (
    "Redis Cluster is not supported by this version: fleet mode has not been run and tested "
    "against a cluster client (its scripts and transactions keep to one hash slot, but "
    "members, budgets and streams are only verified on one server); use one server or Sentinel"
)
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_SERVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
DEFAULT_SENTINEL_PORT = 26379
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


def scheme_of(url: str) -> str:
    """The URL's scheme, lower case ("" if it has none)."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names a master through Sentinel."""
    return scheme_of(url) in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The target of a `redis+sentinel://` URL; `BadRedisUrl` saying what is wrong."""
    scheme = scheme_of(url)
    if scheme not in SENTINEL_SCHEMES:
        raise BadRedisUrl(f"must start with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    rest = url.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise BadRedisUrl("a Sentinel URL takes no query or fragment; the value is not shown")
    netloc, _, path = rest.partition("/")
    username, at, hosts = netloc.rpartition("@")
    if at and (":" in username or not _USER_RE.fullmatch(username)):
        raise BadRedisUrl(
            "must not hold a password (it would be logged with the URL); put it in "
            "fleet.redis_password_file or the systemd credential redis_password; only an ACL "
            "user may come before @; the value is not shown"
        )
    sentinels = tuple(_sentinel_address(part) for part in hosts.split(","))
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


def _sentinel_address(part: str) -> tuple[str, int]:
    host, port = part, str(DEFAULT_SENTINEL_PORT)
    if ":" in part and not part.endswith("]"):
        host, _, port = part.rpartition(":")
    if not _HOST_RE.fullmatch(host):
        raise BadRedisUrl("names a Sentinel without a valid host; the value is not shown")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRedisUrl("names a Sentinel port that is not 1 to 65535; the value is not shown")
    return host.strip("[]"), int(port)


def build_client(
    module: Any, url: str, options: dict[str, Any], *, sentinel_password: str | None = None
) -> aioredis.Redis:
    """The process's client for `url` with the connection `options` (timeouts, retry, TLS,
    password): `from_url` for one endpoint, the Sentinel-managed master otherwise (the
    Sentinels asked with `sentinel_password`, if given)."""
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
