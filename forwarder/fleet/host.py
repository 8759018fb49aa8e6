"""This host in the fleet, as the daemon runs it: started, shown, stopped.

`FleetHost.start` connects (`open_client`: the client certificate checked and the data nodes'
and the Sentinels' passwords read off the event loop), logs the server's durability warnings,
makes the first heartbeat and keeps beating. None of it fails the start when Redis is down:
the host starts in fallback, as it would enter it later; through Sentinel, a Sentinel that
refuses our authentication is named in a `fleet_sentinel_auth_failed` line saying which setting
to fix. What the daemon shows of the fleet (/v1/stats, /readyz, the metrics, STATUS=) is read
here, and the dispatcher's budget factory (`budgets`) makes a `RedisRateBudget` per account.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import structlog

from forwarder import __version__
from forwarder.config.schema import Config, ConfigError
from forwarder.config.tlsfiles import TlsFileError, check_client_certificate
from forwarder.delivery.flow.budget import RateBudget
from forwarder.fleet.budget import RedisRateBudget
from forwarder.fleet.connection import FleetClient, RedisUnavailable, connect
from forwarder.fleet.members import Members
from forwarder.fleet.mode import FleetMode
from forwarder.fleet.topology import is_sentinel_url
from forwarder.ops.credentials import RedisSecrets, resolve_redis_secrets

log = structlog.get_logger("forwarder.fleet")


@runtime_checkable
class SharedQueue(Protocol):
    """What the fleet event log (queue.mode "fleet") adds to the fleet's view and metrics."""

    def queue_view(self) -> dict[str, Any]:
        """The `queue` object inside /v1/stats's `fleet`."""
        ...

    def queue_gauges(self) -> dict[str, tuple[str, float]]:
        """`forwarder_fleet_queue_*` gauges."""
        ...

    def queue_counters(self) -> dict[str, tuple[str, float]]:
        """`forwarder_fleet_queue_*` counters."""
        ...

    def stop_loading(self) -> None:
        """The daemon is stopping: load no more events from the shared queue."""
        ...

    def set_lease_s(self, lease_s: float) -> None:
        """A reload's `fleet.lease_s`: the held leases renewed for it at once."""
        ...

    def set_claim_idle_s(self, claim_idle_s: float) -> None:
        """A reload's `fleet.claim_idle_s`: for the partitions acquired from then on."""
        ...


def member_name(config: Config) -> str:
    """`fleet.member`, else the host name (its first label, as `fleet.member` allows)."""
    if config.fleet.member:
        return config.fleet.member
    return socket.gethostname().split(".")[0] or "forwarder"


async def open_client(config: Config) -> tuple[FleetClient, RedisSecrets]:
    """The fleet's client with its passwords (the data nodes' and the Sentinels', read off the
    event loop); the passwords are returned for the log redactor. The client certificate and
    key are checked first (`ConfigError` naming the setting). No Redis I/O yet."""
    try:
        await asyncio.to_thread(check_client_certificate, config.fleet)
    except TlsFileError as exc:
        raise ConfigError(str(exc)) from None
    passwords = await asyncio.to_thread(resolve_redis_secrets, config)
    client = connect(
        config.fleet,
        member=member_name(config),
        password=passwords.password,
        sentinel_password=passwords.sentinel_password,
    )
    return client, passwords


class FleetHost:
    """The fleet client, the mode, the heartbeat and the budgets of one daemon."""

    def __init__(
        self,
        client: FleetClient,
        *,
        in_delivery: Callable[[], int],
        passwords: RedisSecrets | None = None,
    ) -> None:
        self.client = client
        # Kept only for the log redactor (`secrets`); sent by the client alone.
        self.passwords = passwords or RedisSecrets()
        self.mode = FleetMode()
        self.members = Members(client, self.mode, version=__version__, in_delivery=in_delivery)
        self.budgets_made: dict[str, RedisRateBudget] = {}
        self.queue: SharedQueue | None = None  # with queue.mode "fleet": the event log

    def attach_queue(self, log: object) -> None:
        """Show the shared queue too, if the daemon's event log is the fleet's."""
        self.queue = log if isinstance(log, SharedQueue) else None

    def stop_loading(self) -> None:
        """At a stop: the shared queue (if any) loads nothing more; the drain empties the window."""
        if self.queue is not None:
            self.queue.stop_loading()

    @classmethod
    async def start(cls, config: Config, *, in_delivery: Callable[[], int]) -> FleetHost:
        """Connect, check the server, beat once and keep beating. Raises `ConfigError` when
        redis-py is missing, the password cannot be read or the client certificate cannot be
        used; Redis being down is no error."""
        client, passwords = await open_client(config)
        host = cls(client, in_delivery=in_delivery, passwords=passwords)
        try:
            for warning in await client.check_server():
                log.warning("fleet_redis_settings", warning=warning)
            host.mode.seen(await host.members.beat())
        except RedisUnavailable as exc:
            host.mode.lost(str(exc))
            if is_sentinel_url(config.fleet.redis_url):
                await _say_why_sentinels_refuse(client, passwords.sentinel_password is not None)
        host.members.start()
        log.info(
            "fleet_joined",
            member=client.member,
            key_prefix=client.prefix,
            mode=host.mode.name,
            live_members=host.mode.live_members,
        )
        return host

    def secrets(self) -> list[str]:
        """The Redis and Sentinel passwords, for the log redactor (AccountLanes.secrets)."""
        return self.passwords.revealed()

    async def stop(self) -> None:
        """Stop beating, leave the members, close the client."""
        await self.members.stop()
        await self.client.aclose()

    def budgets(self, account: str, per_minute: int) -> RateBudget:
        """The dispatcher's budget factory: a shared budget per account."""
        budget = RedisRateBudget(account, per_minute, fleet=self.client, mode=self.mode)
        self.budgets_made[account] = budget
        return budget

    def view(self) -> dict[str, Any]:
        """The `fleet` object of /v1/stats."""
        stats = self.client.stats
        return {
            "member": self.client.member,
            "mode": self.mode.name,
            "live_members": self.mode.live_members,
            "fallbacks": self.mode.fallbacks,
            "key_prefix": self.client.prefix,
            "redis_calls": stats.total,
            "redis_errors": sum(stats.errors.values()),
            "redis_seconds": round(sum(stats.seconds.values()), 6),
            "budget_tokens_taken": self.tokens_taken(),
            **({"queue": self.queue.queue_view()} if self.queue else {}),
        }

    def tokens_taken(self) -> int:
        """Tokens this host took from the shared budgets."""
        return sum(b.taken for b in self.budgets_made.values())

    def gauges(self) -> dict[str, tuple[str, float]]:
        """The fleet's gauges (`forwarder_fleet_*`)."""
        return {
            "fleet_mode": (
                "1 while this host uses the fleet's shared budgets, 0 in fallback (Redis out).",
                int(not self.mode.fallback),
            ),
            "fleet_members": (
                "Live fleet members this host last saw (itself included).",
                self.mode.live_members,
            ),
            **(self.queue.queue_gauges() if self.queue else {}),
        }

    def counters(self) -> dict[str, tuple[str, float]]:
        """The fleet's counters (`forwarder_fleet_*`)."""
        stats = self.client.stats
        return {
            "fleet_redis_calls": ("Calls to the fleet's Redis.", stats.total),
            "fleet_redis_errors": (
                "Calls to the fleet's Redis that failed or timed out.",
                sum(stats.errors.values()),
            ),
            "fleet_redis_seconds": (
                "Time spent in calls to the fleet's Redis, seconds.",
                sum(stats.seconds.values()),
            ),
            "fleet_budget_tokens_taken": (
                "Tokens this host took from the accounts' shared rate budgets.",
                self.tokens_taken(),
            ),
            "fleet_fallbacks": ("Times this host fell back to local budgets.", self.mode.fallbacks),
            **(self.queue.queue_counters() if self.queue else {}),
        }


# What each of Sentinel's refusals means for the operator (the server's words, never ours).
_SENTINEL_HINTS = (
    (
        "NOAUTH",
        "the Sentinel asks for a password: set fleet.sentinel_password_file or the "
        "systemd credential sentinel_password",
    ),
    (
        "without any password",
        "the Sentinel has no password: remove fleet.sentinel_password_file "
        "(or the credential sentinel_password), or set its requirepass",
    ),
)
_SENTINEL_WRONG = (
    "the Sentinel refused the Sentinel password (fleet.sentinel_password_file or the systemd "
    "credential sentinel_password; not the data nodes' fleet.redis_password_file)"
)
# A Sentinel's answer to the probe below; it is on the loopback or a private network.
SENTINEL_PROBE_S = 2.5


async def _say_why_sentinels_refuse(client: FleetClient, has_password: bool) -> None:
    """After a failed first call through Sentinel: if a Sentinel refuses our authentication,
    log it in words an operator can act on (redis-py only says MasterNotFoundError)."""
    from redis.exceptions import AuthenticationError

    for sentinel in getattr(client.client, "_fleet_sentinels", ()):
        kwargs = sentinel.connection_pool.connection_kwargs
        where = f"{kwargs.get('host')}:{kwargs.get('port')}"
        try:
            async with asyncio.timeout(SENTINEL_PROBE_S):
                await sentinel.ping()
        except asyncio.CancelledError:
            raise
        except AuthenticationError as exc:
            reason = str(exc).split("\n", 1)[0][:160]
            hint = next((h for key, h in _SENTINEL_HINTS if key in reason), None)
            if hint is None:
                hint = _SENTINEL_WRONG if has_password else _SENTINEL_HINTS[0][1]
            log.error("fleet_sentinel_auth_failed", sentinel=where, reason=reason, error=hint)
            return
        except Exception:  # unreachable or slow: the fallback's own line says so
            continue
