"""Delivery in the daemon: the dispatcher, a lane per account, client-key accounts at run time.

`start_delivery` builds and starts it; `client_session` is the one HTTP session its lanes send
on. Intake's `Accounts` calls in here when it meets a new client key or frees idle ones; a
reload hands every account's lane its settings again through `lane_settings` and `sender`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
import structlog

from forwarder.config.schema import Config
from forwarder.daemon.listeners import StartupError, reason
from forwarder.delivery.dispatcher import Dispatcher
from forwarder.delivery.lane import LaneSettings
from forwarder.delivery.remote import USER_AGENT, RemoteClient, make_ssl_context
from forwarder.intake.accounts import CLIENT_IDLE_S, CLIENT_SWEEP_S, Account
from forwarder.ops.logs import set_secrets
from forwarder.ops.metrics import Metrics
from forwarder.storage.held import HeldEvents
from forwarder.storage.log import EventLog

if TYPE_CHECKING:
    from forwarder.daemon.lifecycle import Daemon

log = structlog.get_logger("forwarder.daemon")


class AccountLanes:
    """Keeps the dispatcher's lanes in step with the accounts (configured and client-key)."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def start_delivery(self, metrics: Metrics, events: EventLog) -> Dispatcher:
        """The dispatcher with a lane per configured account and held events, started."""
        d = self._d
        cfg = d.config
        # The lanes read the event log's window and settle through the log itself.
        d._dispatcher = dispatcher = Dispatcher(
            events.queue,
            outcomes=events,
            stats=d.stats,
            latency=metrics.latency,
            status=events.status,
            budgets=d.fleet.budgets if d.fleet else None,
        )
        for account in d.accounts.configured.values():
            self.add_lane(account)
        d.held = held = HeldEvents(
            events.queue,
            events,
            d.stats,
            max_events=cfg.queue.held_max_events,
            max_age_s=cfg.queue.held_max_age_s,
            has_lane=dispatcher.lanes.__contains__,
            trim=not events.overflow_waits,
        )
        held.on_room = events.wake
        events.kept_out = held.full
        held.start()  # the replayed events of accounts without a lane leave the queue now
        if len(held):
            log.warning(
                "events_held",
                accounts=held.view(),
                reason="no such account configured (or a client key not presented yet)",
                max_events=held.max_events,
                max_age_s=held.max_age_s,
            )
        events.start()
        dispatcher.start()
        return dispatcher

    async def sweep_clients(self) -> None:
        d = self._d
        while True:
            await asyncio.sleep(CLIENT_SWEEP_S)
            d.accounts.free_idle()

    def lane_settings(self, account: Account, config: Config) -> LaneSettings:
        """What a lane of `account` runs with under `config`."""
        return LaneSettings(per_minute=account.per_minute, remote=config.remote, retry=config.retry)

    def sender(self, account: Account) -> RemoteClient:
        """The remote client for `account` on the one session."""
        d = self._d
        assert d._session is not None
        return RemoteClient(d._session, account.base_url, account.key)

    def add_lane(self, account: Account) -> None:
        """Give `account` a lane; events held for it go back to delivery."""
        d = self._d
        assert d._dispatcher is not None
        d._dispatcher.add(account.name, self.sender(account), self.lane_settings(account, d.config))
        if d.held is not None and d.held.release(account.name) and d.log:
            d.log.wake()  # its rows on disk may be read again too

    def add_client_lane(self, account: Account) -> None:
        d = self._d
        # Intake met a new client key: the lane must exist before the event is queued.
        if d._dispatcher is not None:
            lane = d._dispatcher.lanes.get(account.name)
            if lane is not None:
                # A freed account's lane not reaped yet: take it back, never run two pumps.
                lane.retired = False
                lane.configure(self.lane_settings(account, d.config), self.sender(account))
            else:
                self.add_lane(account)
            set_secrets(self.secrets())
            log.info("client_account_added", account=account.name)

    def client_busy(self, name: str) -> bool:
        """Whether a client account has events queued, in delivery or possibly on disk only."""
        d = self._d
        if d.queue.depth(name):
            return True
        dispatcher = d._dispatcher
        lane = dispatcher.lanes.get(name) if dispatcher is not None else None
        if lane is not None and not lane.idle:
            return True
        # Events stored and not read into memory yet may be this account's. Which account a
        # row belongs to is not counted, so while any wait on disk no client account is freed.
        return bool(d.log is not None and d.log.on_disk_only)

    def free_clients(self, freed: list[Account]) -> None:
        """Idle client accounts were freed: their lanes, metrics and redacted keys go too."""
        d = self._d
        for account in freed:
            if d._dispatcher is not None:
                d._dispatcher.retire(account.name)  # idle: the lane is stopped at once
            if d._metrics is not None:
                d._metrics.latency.remove(account.name)
        set_secrets(self.secrets())
        log.info(
            "client_accounts_freed",
            count=len(freed),
            open=len(d.accounts.clients),
            idle_s=CLIENT_IDLE_S,
        )

    def secrets(self) -> list[str]:
        """Every secret the logs must redact: the accounts' keys, the intake token and the
        fleet's Redis password."""
        d = self._d
        accounts = [*d.accounts.configured.values(), *d.accounts.clients.values()]
        token = [d.intake_token.secret.reveal()] if d.intake_token else []
        redis = d.fleet.secrets() if d.fleet else []
        return [a.key.reveal() for a in accounts] + token + redis


async def client_session(cfg: Config) -> aiohttp.ClientSession:
    """The one HTTP session to the remote: verified TLS, no proxies from the environment."""
    try:
        # Reads the CA files: off the event loop. Checked at load; it could change since.
        tls = await asyncio.to_thread(make_ssl_context, cfg.remote.ca_bundle)
    except OSError as exc:  # ssl.SSLError is one too
        raise StartupError(f"remote.ca_bundle: {reason(exc)}") from None
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=cfg.remote.timeout_s, connect=cfg.remote.connect_timeout_s
        ),
        connector=aiohttp.TCPConnector(limit=0, ssl=tls),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,
    )
