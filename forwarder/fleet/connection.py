"""The fleet's Redis connection: one client per process, every call bounded, the server checked.

`connect` builds the one `redis.asyncio` client of a process from `[fleet]`: the URL
(`redis://`, `rediss://` with TLS, certificate and host name always verified against the
system's trust store and `fleet.ca_bundle`, the client certificate `fleet.tls_cert_file` /
`fleet.tls_key_file` presented if set; `unix://`), the password (`fleet.redis_password_file`,
else the systemd credential `redis_password`; never in the URL, a log, an error or a repr),
socket timeouts, redis-py's `Retry` with exponential backoff on connection errors and
timeouts, and a health check of idle connections. On top, `FleetClient.call` bounds every
call as a whole (retries included) and turns any failure to reach Redis into
`RedisUnavailable`, whose message names the operation and the kind of failure only (its type
and its causes' types, `failure_kind`: a cluster client wraps a refused login or an
unverified certificate in `RedisClusterException`): the fallback code catches that one
exception.

A master behind Sentinel (`redis+sentinel://`) or a Redis Cluster (`redis+cluster://`) is not
a URL redis-py's `from_url` reads: `topology.build_client` makes that client. On a cluster a
slot whose primary is down or being failed over answers CLUSTERDOWN / TRYAGAIN / MOVED, or its
node refuses connections: all of them are `RedisUnavailable` (not refusals), so the host falls
back for the seconds a failover takes.

At start `check_server` reads `CONFIG GET appendonly appendfsync maxmemory-policy` (on a
cluster from every node, primaries and replicas: a replica promoted later holds the data then)
and returns one warning per setting that can lose acknowledged writes or evict keys, naming the
node on a cluster; a server that refuses CONFIG (managed Redis renames it) is a warning too,
never a start failure.
"""

from __future__ import annotations

import asyncio
import importlib
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from forwarder.config.schema import ConfigError, FleetConfig
from forwarder.fleet.topology import TLS_SCHEMES, build_client, is_cluster_client, scheme_of
from forwarder.ops.credentials import Secret

if TYPE_CHECKING:
    import redis.asyncio as aioredis

T = TypeVar("T")

INSTALL_HINT = "pip install 'forwarder[fleet]'"
# One socket read or connect: Redis answers in well under a millisecond, so a second is a
# server that is frozen, gone or unreachable.
SOCKET_TIMEOUT_S = 1.0
# redis-py retries a call this many times on a connection error or timeout, backing off.
RETRIES = 1
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
# Every call as a whole, retries included: the fallback starts within this.
CALL_TIMEOUT_S = 2.5
# Idle pooled connections are PINGed before use after this long (a server restart, a NAT).
HEALTH_CHECK_INTERVAL_S = 15
# Connections one process may open (on a cluster: to each node); the budget and the
# heartbeat need few.
MAX_CONNECTIONS = 32
CHECKED_SETTINGS = ("appendonly", "appendfsync", "maxmemory-policy")


class RedisUnavailable(Exception):
    """Redis did not answer a call in time, the connection failed, or the server refused the
    command (`refused`: out of memory with noeviction, a read-only replica, an ACL). No secret
    is in the text."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def import_redis() -> ModuleType:
    """`redis.asyncio`, or a start error saying how to install it (the extra is optional)."""
    try:
        return importlib.import_module("redis.asyncio")
    except ImportError:
        raise ConfigError(
            f"fleet.redis_url is set but redis-py is not installed: {INSTALL_HINT}"
        ) from None


@dataclass
class CallStats:
    """Redis calls of this process, by operation: counted, failed, and their time."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self, op: str, elapsed_s: float, *, failed: bool) -> None:
        """Count one call of `op` that took `elapsed_s`."""
        self.calls[op] = self.calls.get(op, 0) + 1
        self.seconds[op] = self.seconds.get(op, 0.0) + elapsed_s
        if failed:
            self.errors[op] = self.errors.get(op, 0) + 1

    @property
    def total(self) -> int:
        """All calls so far."""
        return sum(self.calls.values())


class FleetClient:
    """The process's Redis client with the fleet's key layout; every call through `call`."""

    def __init__(self, client: aioredis.Redis, fleet: FleetConfig, member: str) -> None:
        self.client = client
        self.prefix = fleet.key_prefix
        self.member = member
        self.stats = CallStats()
        self._errors: tuple[type[BaseException], ...] = _unavailable_errors()
        self._refusals: tuple[type[BaseException], ...] = _refusal_errors()

    def __repr__(self) -> str:
        # Neither the URL's details nor the password: only what identifies the fleet.
        return f"<FleetClient member={self.member!r} prefix={self.prefix!r}>"

    def account_key(self, account: str, suffix: str) -> str:
        """`{PREFIX:ACCOUNT}:SUFFIX`: an account's keys share one hash slot."""
        return f"{{{self.prefix}:{account}}}:{suffix}"

    def key(self, suffix: str) -> str:
        """`PREFIX:SUFFIX`: a fleet-wide key (members, accounts)."""
        return f"{self.prefix}:{suffix}"

    async def call(
        self, op: str, make: Callable[[], Awaitable[T]], timeout_s: float = CALL_TIMEOUT_S
    ) -> T:
        """Run one Redis call, bounded as a whole; `RedisUnavailable` if Redis cannot answer.

        A cancellation of the calling task always ends the call with `CancelledError`, even one
        redis-py swallowed (see `_restore_cancel`)."""
        started = time.perf_counter()
        failed = True
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(timeout_s):
                result = await make()
            failed = False
            return result
        except TimeoutError:
            raise RedisUnavailable(f"redis {op}: no answer within {timeout_s:g} s") from None
        except self._errors as exc:
            raise RedisUnavailable(f"redis {op}: {failure_kind(exc)}") from None
        except self._refusals as exc:
            # The server's own words (e.g. "OOM command not allowed..."); never our arguments.
            reason = str(exc).split("\n", 1)[0][:120]
            raise RedisUnavailable(
                f"redis {op}: refused ({type(exc).__name__}: {reason})", refused=True
            ) from None
        finally:
            self.stats.record(op, time.perf_counter() - started, failed=failed)
            _restore_cancel(task, cancels)

    async def check_server(self) -> list[str]:
        """Warnings about server settings that can lose acknowledged writes or evict keys
        (on a cluster: of every node, each warning naming its node)."""
        if is_cluster_client(self.client):
            return await self._check_cluster()
        return await self._check_node(None, "the Redis server")

    async def _check_node(self, node: Any, name: str) -> list[str]:
        """The warnings of one server (`node`: a cluster node, None: the only server)."""
        target: dict[str, Any] = {} if node is None else {"target_nodes": node}
        try:
            got: dict[Any, Any] = await self.call(
                "config_get",
                lambda: self.client.config_get(*CHECKED_SETTINGS, **target),
            )
        except RedisUnavailable as exc:
            if not exc.refused:
                raise
            # A managed server refuses CONFIG: a warning, not a failure.
            return [
                f"{name} refused CONFIG GET ({exc}): check by hand that appendonly "
                "is yes and maxmemory-policy is noeviction (docs/how-to/fleet.md)"
            ]
        where = "" if node is None else f" on node {node.name}"
        return server_warnings({as_text(k): as_text(v) for k, v in got.items()}, where)

    async def _check_cluster(self) -> list[str]:
        # The slot map first (it names every node, replicas too); unreachable: unavailable.
        cluster: Any = self.client
        await self.call("cluster_nodes", cluster.initialize)
        warnings: list[str] = []
        # host:port only: the node's name never holds a secret.
        for node in sorted(cluster.get_nodes(), key=lambda n: n.name):
            try:
                warnings += await self._check_node(node, f"Redis node {node.name}")
            except RedisUnavailable as exc:
                # One node down (a replica, say) is a warning; the fleet works without it.
                warnings.append(
                    f"Redis node {node.name} did not answer CONFIG GET ({exc}): check its "
                    "appendonly and maxmemory-policy by hand (docs/how-to/fleet.md)"
                )
        return warnings

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        await self.client.aclose()


def server_warnings(settings: dict[str, str], where: str = "") -> list[str]:
    """One warning per setting that loses acknowledged writes or evicts keys, naming it (and
    `where`, e.g. " on node HOST:PORT", after it)."""
    warnings = []
    if settings.get("appendonly", "").lower() != "yes":
        warnings.append(
            f"Redis appendonly is not yes{where}: a restart of the server loses what it "
            "acknowledged since its last snapshot (set appendonly yes)"
        )
    elif settings.get("appendfsync", "").lower() == "no":
        warnings.append(
            f"Redis appendfsync is no{where}: a power cut or kernel crash loses acknowledged "
            "writes the system had not flushed (set appendfsync always, or everysec: at most "
            "~1 s)"
        )
    policy = settings.get("maxmemory-policy", "")
    if policy.lower() != "noeviction":
        warnings.append(
            f"Redis maxmemory-policy is {policy or 'unknown'}{where}: the server may evict the "
            "fleet's keys when memory is full (set maxmemory-policy noeviction)"
        )
    return warnings


def connect(
    fleet: FleetConfig,
    *,
    member: str,
    password: Secret | None,
    socket_timeout_s: float = SOCKET_TIMEOUT_S,
    sentinel_password: Secret | None = None,
) -> FleetClient:
    """The process's fleet client (no I/O yet: the first call connects). `sentinel_password`:
    the Sentinels' own, with a Sentinel URL (credentials.resolve_sentinel_password)."""
    aioredis = import_redis()
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, OSError],
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "max_connections": MAX_CONNECTIONS,
        "client_name": f"forwarder-{member}",
    }
    if password is not None:
        options["password"] = password.reveal()
    if scheme_of(fleet.redis_url) in TLS_SCHEMES:
        # Certificates and host names always verified, as for the remote.
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        # A private CA, added to the system's trust store (redis-py loads it into its default
        # context); the client certificate for a server that asks for one (mutual TLS).
        if fleet.ca_bundle:
            options["ssl_ca_certs"] = fleet.ca_bundle
        if fleet.tls_cert_file and fleet.tls_key_file:
            options["ssl_certfile"] = fleet.tls_cert_file
            options["ssl_keyfile"] = fleet.tls_key_file
    sentinel = sentinel_password.reveal() if sentinel_password is not None else None
    client = build_client(aioredis, fleet.redis_url, options, sentinel_password=sentinel)
    return FleetClient(client, fleet, member)


def _restore_cancel(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """Raise `CancelledError` if the task was cancelled during a call that returned anyway.

    redis-py awaits `asyncio.wait_for` around socket writes, and on Python 3.11 `wait_for`
    returns the inner result when a cancellation arrives just as the inner call completes
    (CPython gh-86296, fixed in 3.12): the `CancelledError` is lost. Lost in the heartbeat,
    `Members.stop` waited for the task for ever while it beat on. The task's count of pending
    cancellations still says so (`asyncio.timeout` takes its own back on exit), so it is raised
    again here.
    """
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    # BusyLoadingError (a restart reading its AOF) is a ConnectionError in redis-py. A cluster
    # in a failover answers CLUSTERDOWN / MASTERDOWN (ClusterError, also "TTL exhausted": a
    # MOVED storm), TRYAGAIN, a MOVED or ASK redis-py gave up following, or no node covers the
    # slot (SlotNotCoveredError, a RedisClusterException, which is no RedisError): the slot's
    # data is away for a while, the host falls back; never a refusal, never a crash.
    return (
        RedisConnectionError,
        RedisTimeoutError,
        OSError,
        ClusterError,
        TryAgainError,
        AskError,
        RedisClusterException,
    )


# How deep `failure_kind` follows causes (the cluster client wraps once, redis-py once more).
CAUSE_DEPTH = 3


def failure_kind(exc: BaseException) -> str:
    """`exc`'s type, and in brackets the types of what caused it: "RedisClusterException
    (AuthenticationError)" when no cluster node lets us in, "... (ConnectionError,
    SSLCertVerificationError)" when none has a certificate we trust, "ConnectionError (SSLError
    TLSV13_ALERT_CERTIFICATE_REQUIRED)" when the server wants a client certificate. Types (and
    OpenSSL's reason code) only: the texts hold addresses and the server's words, and a
    wrapped text could hold anything."""
    names = [_kind_name(exc)]
    cause = _cause_of(exc)
    # Not a cancellation inside a timeout (the timeout says it), nor a name twice in a row
    # (redis-py's TimeoutError raised for the built-in one).
    while isinstance(cause, Exception) and len(names) <= CAUSE_DEPTH:
        if _kind_name(cause) != names[-1]:
            names.append(_kind_name(cause))
        cause = _cause_of(cause)
    return names[0] + (f" ({', '.join(names[1:])})" if len(names) > 1 else "")


def _kind_name(exc: BaseException) -> str:
    # A bare SSLError says nothing of what failed; OpenSSL's reason is a fixed code naming it
    # (TLSV13_ALERT_CERTIFICATE_REQUIRED: the server wants a client certificate), no text.
    if type(exc) is ssl.SSLError and isinstance(exc.reason, str) and exc.reason.isidentifier():
        return f"SSLError {exc.reason}"
    return type(exc).__name__


def _cause_of(exc: BaseException) -> BaseException | None:
    # redis-py raises its ConnectionError inside `except OSError` without `from`: the context.
    return exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)


def _refusal_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    # Whatever else the server answers with an error: the call failed, the host falls back.
    return (RedisError,)


def as_text(value: object) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
