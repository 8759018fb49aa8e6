"""The daemon's lifecycle: start → serve → (signal) → stop intake → drain → save → stop.

Teardown order matters and is the reverse of start: intake stops admitting first (apps get 503
and keep their events), delivery drains for up to `shutdown.timeout_s`, whatever is left is saved
to `pending.jsonl`, then the listeners and the HTTP session close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import resource
import signal
import socket
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from forwarder.config.schema import (
    RESTART_ONLY,
    Config,
    ConfigError,
    check_exposure,
    resolve_group,
)
from forwarder.delivery.dispatcher import Dispatcher, LaneSettings
from forwarder.delivery.remote import USER_AGENT, RemoteClient, make_ssl_context
from forwarder.events import Event
from forwarder.intake.accounts import (
    CLIENT_IDLE_S,
    CLIENT_SWEEP_S,
    MAX_CLIENT_KEYS,
    Account,
    Accounts,
)
from forwarder.intake.app import IntakeState, create_app
from forwarder.intake.connections import ConnectionGuard, IntakeRunner
from forwarder.ops.credentials import ApiKey, resolve_intake_token
from forwarder.ops.logthrottle import LogThrottle
from forwarder.ops.statedir import (
    StateDirError,
    StateLock,
    prepare_state_dir,
    read_state_file,
    replace_state_file,
)
from forwarder.ops.systemd import (
    ListenSocket,
    Notifier,
    PerMinute,
    Watchdog,
    drain_timeout_s,
    format_status,
    listen_sockets,
    stop_timeout_s,
    watchdog_interval,
)
from forwarder.ops.telemetry import Metrics, Stats, flush_logs, set_log_level, set_secrets
from forwarder.storage.backlog import Backlog
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.held import HeldEvents
from forwarder.storage.numbering import EventNumbers, NumbersError
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.file import SpoolError
from forwarder.storage.sqlite.recover import Recovery
from forwarder.storage.sqlite.spool import Spool
from forwarder.storage.sqlite.upgrade import load_pending, remove_pending

log = structlog.get_logger("forwarder.daemon")
# aiohttp's grace for requests still being answered when the listeners close.
HANDLER_GRACE_S = 2.0
PID_FILE = "forwarder.pid"
# How often STATUS= goes to systemd.
STATUS_EVERY_S = 5.0
# Kept between the drain's end and systemd's SIGKILL, for saving and closing.
STOP_RESERVE_S = 5.0
# File descriptors wanted besides intake's connections: listeners, the spool, the remote's
# connections, logs.
FD_RESERVE = 256
# What a reload reads: the new config and its accounts (keys resolved), or a ConfigError.
Loader = Callable[[], tuple[Config, dict[str, Account]]]


class StartupError(Exception):
    """The daemon cannot start (a listener cannot be bound, the state dir is unusable...)."""


class Daemon:
    """One forwarder process: intake, queue, dispatcher and their orderly shutdown."""

    def __init__(
        self, config: Config, accounts: dict[str, Account], *, loader: Loader | None = None
    ) -> None:
        self.config = config
        self._loader = loader
        self.stats = Stats()
        self.queue = EventQueue(
            config.queue.max_events,
            max_bytes=config.queue.max_bytes,
            ordered=config.remote.per_recipient_order,
        )
        self.accounts = Accounts(
            accounts,
            default=config.remote.default_account,
            accept_client_keys=config.intake.accept_client_keys,
            client_template=accounts.get(config.remote.default_account),
            on_new_client=self._add_client_lane,
            on_clients_freed=self._free_clients,
            busy=self._client_busy,
        )
        self.addresses: list[str] = []
        self.ready = asyncio.Event()
        self.reloads = 0
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._shutting_down = False
        self._dispatcher: Dispatcher | None = None
        self._session: aiohttp.ClientSession | None = None
        self._state: IntakeState | None = None
        self._reload_task: asyncio.Task[bool] | None = None
        self._spool: Spool | None = None
        self.backlog: Backlog | None = None
        self.numbers: EventNumbers | None = None
        self.status: StatusBook | None = None
        self.held: HeldEvents | None = None
        self.notifier = Notifier.from_env()
        self._activated: list[ListenSocket] = []
        self._status_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._metrics: Metrics | None = None
        self._delivery_rate = PerMinute()
        self._intake_token: ApiKey | None = None
        intake = config.intake
        # One throttle for every log line a request can cause (logthrottle.py), flushed at stop.
        self.log_throttle = LogThrottle()
        self.connections = ConnectionGuard(
            max_connections=intake.max_connections,
            header_timeout_s=intake.header_timeout_s,
            keepalive_timeout_s=intake.keepalive_timeout_s,
            write_timeout_s=intake.write_timeout_s,
            throttle=self.log_throttle,
        )

    def request_stop(self) -> None:
        """Begin a graceful stop (as SIGTERM does); a second call stops without draining."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def _not_ready_reason(self) -> str:
        if self._shutting_down:
            return "shutting down"
        if not self.ready.is_set():
            return "starting"
        if self._dispatcher is not None:
            return self._dispatcher.not_ready_reason()
        return ""

    def _gauges(self) -> dict[str, tuple[str, float]]:
        d = self._dispatcher
        paused = bool(d and any(lane.auth.is_open for lane in d.lanes.values()))
        return {
            "queue_depth": ("Events waiting in the queue.", len(self.queue)),
            "queue_capacity": ("queue.max_events.", self.queue.max_events),
            "queue_bytes": (
                "Estimated bytes of the events in memory (waiting and in delivery).",
                self.queue.bytes,
            ),
            "queue_bytes_capacity": ("queue.max_bytes.", self.queue.max_bytes),
            "in_flight": ("Events in delivery.", self.queue.in_delivery),
            "delivery_paused": ("1 while the remote refuses a key.", int(paused)),
            "ready": ("1 when /readyz answers 200.", int(not self._not_ready_reason())),
            "backlog_events": (
                "Events accepted and not settled yet: waiting, in delivery or spooled.",
                self._backlog_events(),
            ),
            "oldest_event_age_seconds": (
                "Age of the oldest event not settled yet, in memory or in the spool (0: none).",
                self._oldest_age_s(),
            ),
            "config_reloads": ("Configuration reloads applied.", self.reloads),
            "connections_open": ("Intake connections open now.", self.connections.open),
            "connections_max": ("intake.max_connections.", self.connections.max_connections),
            "client_accounts": (
                "Client-key accounts open now (intake.accept_client_keys).",
                len(self.accounts.clients),
            ),
            **self._spool_gauges(),
        }

    def _not_ready_conditions(self) -> dict[str, bool]:
        """Why /readyz says 503, as a fixed set of conditions (labels of forwarder_not_ready)."""
        lanes = list(self._dispatcher.lanes.values()) if self._dispatcher else []
        return {
            "starting": not self.ready.is_set() and not self._shutting_down,
            "shutting_down": self._shutting_down,
            "breaker_open": any(lane.breaker.is_open and not lane.retired for lane in lanes),
            "key_refused": any(lane.auth.is_open and not lane.retired for lane in lanes),
        }

    def _backlog_events(self) -> int:
        # Durable mode: every unsettled event is in the spool (the queue is a window over it);
        # memory mode: the spool holds none until a stop, the queue holds them all.
        in_memory = len(self.queue) + self.queue.in_delivery
        return max(in_memory, self._spool.depth if self._spool else 0)

    def _oldest_age_s(self) -> float:
        stamps = [self.queue.oldest_accepted_at()]
        if self._spool is not None:
            stamps.append(self._spool.oldest_accepted_at)
        oldest = min((t for t in stamps if t), default=None)
        return max(0.0, time.time() - oldest) if oldest else 0.0

    def _counters(self) -> dict[str, tuple[str, float]]:
        guard = self.connections
        return {
            "connections_refused": (
                "Intake connections past intake.max_connections, answered 503 and closed.",
                guard.refused,
            ),
            "connections_header_timeouts": (
                "Intake connections closed: a request head not in within intake.header_timeout_s.",
                guard.header_timeouts,
            ),
            "client_accounts_refused": (
                "Drop-in requests refused (503) because every client-account slot was taken.",
                self.accounts.refused_at_cap,
            ),
            "client_accounts_freed": (
                "Client accounts freed after being idle.",
                self.accounts.freed,
            ),
            "connections_write_timeouts": (
                "Intake connections closed: an answer waited on an unread socket past "
                "intake.write_timeout_s.",
                guard.write_timeouts,
            ),
        }

    def _spool_gauges(self) -> dict[str, tuple[str, float]]:
        spool, backlog = self._spool, self.backlog
        if spool is None:
            return {}
        oldest = spool.oldest_accepted_at
        return {
            "spool_events": ("Events in the spool (state.dir/spool.db).", spool.depth),
            "spool_bytes": ("Bytes of events in the spool.", spool.bytes),
            "spool_bytes_capacity": (
                "queue.max_disk_bytes (0: no bound).",
                self.config.queue.max_disk_bytes,
            ),
            "spool_oldest_event_age_seconds": (
                "Age of the oldest event in the spool (0 when empty).",
                max(0.0, time.time() - oldest) if oldest else 0.0,
            ),
            "spool_dead_letters": ("Dead letters kept in the spool.", spool.dead_letters),
            "spool_on_disk_only": (
                "Spooled events not in memory yet (durable mode's backlog).",
                backlog.on_disk_only if backlog else 0,
            ),
            "spool_replayed_events": (
                "Events brought back from the spool into memory since start.",
                backlog.replayed if backlog else 0,
            ),
        }

    def _account_views(self) -> dict[str, dict[str, Any]]:
        d = self._dispatcher
        return {name: lane.view() for name, lane in d.lanes.items()} if d else {}

    def _stats_extra(self) -> dict[str, Any]:
        held = {
            name: self.queue.depth(name)
            for name in self.queue.accounts()
            if self._dispatcher is None or name not in self._dispatcher.lanes
        }
        for name, count in (self.held.view() if self.held else {}).items():
            held[name] = held.get(name, 0) + count
        return {
            "in_flight": self.queue.in_delivery,
            "delivery": {
                "ready": not self._not_ready_reason(),
                "reason": self._not_ready_reason(),
                "default_account": self.accounts.default,
                "per_recipient_order": self.queue.ordered,
                "config_reloads": self.reloads,
            },
            "accounts": self._account_views(),
            "backlog_events": self._backlog_events(),
            "oldest_event_age_s": round(self._oldest_age_s(), 3),
            "not_ready": [name for name, on in self._not_ready_conditions().items() if on],
            "last_error": self.stats.last_error,
            "connections": self.connections.view(),
            "client_accounts": {
                "open": len(self.accounts.clients),
                "max": MAX_CLIENT_KEYS,
                "idle_s": CLIENT_IDLE_S,
                "refused": self.accounts.refused_at_cap,
                "freed": self.accounts.freed,
            },
            # Events of accounts that have no lane now: a removed account, or a client key
            # not presented since a restart. Held apart from the queue's bound, saved at a stop,
            # and dead-lettered past queue.held_max_events / queue.held_max_age_s (held.py).
            "held_without_account": {k: v for k, v in held.items() if v},
            "spool": {
                "mode": self.config.queue.mode,
                **{name: value for name, (_, value) in self._spool_gauges().items()},
            },
        }

    def _status_line(self, prefix: str = "") -> str:
        return prefix + format_status(
            queued=len(self.queue) + (self.backlog.on_disk_only if self.backlog else 0),
            in_delivery=self.queue.in_delivery,
            delivered_per_min=self._delivery_rate.observe(self.stats.delivered),
            spool=self._spool.depth if self._spool else 0,
        )

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            reason = self._not_ready_reason()
            self.notifier.status(self._status_line(prefix=f"{reason}; " if reason else ""))
            if self._dispatcher is not None:
                # Per-account delivered-per-minute rates need samples even when nobody reads.
                for lane in self._dispatcher.lanes.values():
                    lane.delivered_rate.observe(lane.delivered)

    def _healthy(self) -> bool:
        """For the watchdog: the event loop turns (this runs) and every lane still pulls."""
        return self._dispatcher is None or self._dispatcher.healthy()

    def _lane_settings(self, account: Account, config: Config) -> LaneSettings:
        return LaneSettings(per_minute=account.per_minute, remote=config.remote, retry=config.retry)

    def _sender(self, account: Account) -> RemoteClient:
        assert self._session is not None
        return RemoteClient(self._session, account.base_url, account.key)

    def _add_lane(self, account: Account) -> None:
        assert self._dispatcher is not None
        self._dispatcher.add(
            account.name, self._sender(account), self._lane_settings(account, self.config)
        )
        if self.held is not None and self.held.release(account.name) and self.backlog:
            self.backlog.wake()  # its rows on disk may be read again too

    def _add_client_lane(self, account: Account) -> None:
        # Intake met a new client key: the lane must exist before the event is queued.
        if self._dispatcher is not None:
            lane = self._dispatcher.lanes.get(account.name)
            if lane is not None:
                # A freed account's lane not reaped yet: take it back, never run two pumps.
                lane.retired = False
                lane.configure(self._lane_settings(account, self.config), self._sender(account))
            else:
                self._add_lane(account)
            set_secrets(self._secrets())
            log.info("client_account_added", account=account.name)

    def _client_busy(self, name: str) -> bool:
        """Whether a client account has events queued, in delivery or possibly on disk only."""
        if self.queue.depth(name):
            return True
        d = self._dispatcher
        lane = d.lanes.get(name) if d is not None else None
        if lane is not None and not lane.idle:
            return True
        # Durable mode: rows not read into memory yet may be this account's. Which account a
        # row belongs to is not counted, so while any wait on disk no client account is freed.
        return bool(self.backlog is not None and self.backlog.on_disk_only)

    def _free_clients(self, freed: list[Account]) -> None:
        """Idle client accounts were freed: their lanes, metrics and redacted keys go too."""
        for account in freed:
            if self._dispatcher is not None:
                self._dispatcher.retire(account.name)  # idle: the lane is stopped at once
            if self._metrics is not None:
                self._metrics.latency.remove(account.name)
        set_secrets(self._secrets())
        log.info(
            "client_accounts_freed",
            count=len(freed),
            open=len(self.accounts.clients),
            idle_s=CLIENT_IDLE_S,
        )

    async def _sweep_clients(self) -> None:
        while True:
            await asyncio.sleep(CLIENT_SWEEP_S)
            self.accounts.free_idle()

    def _secrets(self) -> list[str]:
        accounts = [*self.accounts.configured.values(), *self.accounts.clients.values()]
        token = [self._intake_token.secret.reveal()] if self._intake_token else []
        return [a.key.reveal() for a in accounts] + token

    def _listeners(self, config: Config) -> list[tuple[str, str]]:
        """The TCP listeners as (where, host), for `check_exposure`: systemd's, or ours."""
        if self._activated:
            return [
                (f"socket activation: {a.address} (fd {a.fd})", str(a.sock.getsockname()[0]))
                for a in self._activated
                if a.family in (socket.AF_INET, socket.AF_INET6)
            ]
        tcp = config.intake.tcp_address
        return [("intake.http_listen", tcp[0])] if tcp is not None else []

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if self._reload_task is not None:
                self._reload_task.cancel()
                await asyncio.gather(self._reload_task, return_exceptions=True)

    def _on_reload_signal(self) -> None:
        log.info("signal", signal="SIGHUP", action="reload configuration")
        self.request_reload()

    def request_reload(self) -> asyncio.Task[bool]:
        """Re-read the configuration and apply it (as SIGHUP does); reloads never overlap."""
        previous = self._reload_task
        if previous is not None and not previous.done():
            return previous
        self._reload_task = asyncio.create_task(self.reload(), name="config-reload")
        return self._reload_task

    async def reload(self) -> bool:
        """Apply a new configuration; a bad one is refused and the running one stays."""
        if self._loader is None or self._dispatcher is None or self._shutting_down:
            log.warning("reload_skipped", reason="not running")
            return False
        self.notifier.reloading("reloading the configuration")
        try:
            applied = await self._reload()
        finally:
            # READY=1 after RELOADING=1 in every case, or systemd waits out its reload timeout.
            self.notifier.ready(self._status_line(prefix="" if applied else "reload refused; "))
        return applied

    async def _reload(self) -> bool:
        assert self._dispatcher is not None
        assert self._loader is not None
        try:
            # Reading files (config, key files) is blocking: off the event loop.
            config, accounts = await asyncio.to_thread(self._loader)
            if config.remote.default_account not in accounts:
                raise ConfigError(
                    f"remote.default_account: no API key for account "
                    f"{config.remote.default_account!r}"
                )
            token = await asyncio.to_thread(resolve_intake_token, config)
            # Against the listeners serving now: their addresses need a restart to change.
            check_exposure(self._listeners(self.config), token is not None)
        except ConfigError as exc:
            log.error("reload_refused", error=str(exc), action="the running configuration stays")
            return False
        old = self.config
        changed = _changed_keys(old, config)
        # Settings declared with reload=False (config.RESTART_ONLY) need a restart to change.
        restart_needed = [key for key in changed if key in RESTART_ONLY]
        # What cannot change at run time keeps its running value, so `self.config` stays true.
        for key in restart_needed:
            section, name = key.split(".", 1)
            running = getattr(getattr(old, section), name)
            config = dataclasses.replace(
                config,
                **{section: dataclasses.replace(getattr(config, section), **{name: running})},
            )
        self.config = config
        self.queue.max_events = config.queue.max_events
        self.queue.max_bytes = config.queue.max_bytes
        if self.held is not None:
            self.held.max_events = config.queue.held_max_events
            self.held.max_age_s = config.queue.held_max_age_s
        if self._spool is not None:
            self._spool.group_window_s = config.queue.group_commit_ms / 1000
        self.queue.set_ordered(config.remote.per_recipient_order)
        set_log_level(config.log.level)
        assert self._state is not None
        self._state.max_batch = config.intake.max_batch
        self._state.body_timeout_s = config.intake.body_timeout_s
        self._state.drop_in_answer = config.intake.drop_in_answer
        if self.status is not None:
            self.status.retention_s = config.state.outcome_retention_s
            self.status.max_count = config.state.outcome_max_count
        self.connections.max_connections = config.intake.max_connections
        self.connections.header_timeout_s = config.intake.header_timeout_s
        self.connections.keepalive_timeout_s = config.intake.keepalive_timeout_s
        self.connections.write_timeout_s = config.intake.write_timeout_s
        _ensure_fd_room(config.intake.max_connections)
        self._intake_token = token
        self._state.auth_token = token.secret if token else None
        previous = dict(self.accounts.configured)
        self.accounts.update(
            accounts,
            default=config.remote.default_account,
            accept_client_keys=config.intake.accept_client_keys,
            client_template=accounts[config.remote.default_account],
        )
        added, removed = self._apply_accounts(accounts, config, previous)
        set_secrets(self._secrets())
        self.reloads += 1
        log.info(
            "reloaded",
            changed=changed,
            accounts_added=added,
            accounts_removed=removed,
            **({"restart_needed": restart_needed} if restart_needed else {}),
        )
        return True

    def _apply_accounts(
        self, accounts: dict[str, Account], config: Config, previous: dict[str, Account]
    ) -> tuple[list[str], list[str]]:
        assert self._dispatcher is not None
        lanes = self._dispatcher.lanes
        added: list[str] = []
        for name, account in accounts.items():
            lane = lanes.get(name)
            if lane is None:
                self._add_lane(account)
                added.append(name)
                continue
            lane.retired = False
            current = previous.get(name)
            sender = None
            if current is None or (current.base_url, current.key) != (
                account.base_url,
                account.key,
            ):
                sender = self._sender(account)
            lane.configure(self._lane_settings(account, config), sender)
        template = accounts[config.remote.default_account]
        for name, client in self.accounts.clients.items():
            lane = lanes.get(name)
            if lane is not None:
                settings = LaneSettings(template.per_minute, config.remote, config.retry)
                if client.base_url != template.base_url:
                    client = dataclasses.replace(client, base_url=template.base_url)
                    self.accounts.clients[name] = client
                    lane.configure(settings, self._sender(client))
                else:
                    lane.configure(settings)
        removed = [
            name for name in lanes if name not in accounts and name not in self.accounts.clients
        ]
        for name in removed:
            log.warning(
                "account_removed",
                account=name,
                queued=self.queue.depth(name),
                action="delivers what it holds, then stops",
            )
            self._dispatcher.retire(name)
        return added, removed

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.warning("second_signal", signal=signal.Signals(signum).name, action="stop now")
        else:
            log.info("signal", signal=signal.Signals(signum).name, action="graceful stop")
        self.request_stop()

    async def _run(self) -> int:
        cfg = self.config
        state_dir = cfg.state.path
        started = time.monotonic()
        metrics = Metrics(
            self.stats,
            self._gauges,
            self._account_views,
            self._counters,
            not_ready=self._not_ready_conditions,
        )
        self._metrics = metrics
        try:
            # systemd socket activation: serve on the sockets it passed instead of binding.
            self._activated = listen_sockets()
        except ValueError as exc:
            log.error("startup_failed", error=str(exc))
            return 1
        try:
            # A token file is read: off the event loop. Refused before anything is bound.
            self._intake_token = await asyncio.to_thread(resolve_intake_token, self.config)
            check_exposure(self._listeners(self.config), self._intake_token is not None)
        except ConfigError as exc:
            log.error("startup_failed", error=str(exc))
            for activated in self._activated:
                activated.sock.close()
            return 1
        set_secrets(self._secrets())
        interval = watchdog_interval()
        watchdog = Watchdog(self.notifier, interval, self._healthy) if interval else None
        if watchdog is not None:
            watchdog.start()  # from the start: a slow replay must not look like a hang
        try:
            return await self._open_spool_and_run(state_dir, metrics, started)
        finally:
            if watchdog is not None:
                await watchdog.stop()
            self.notifier.close()
            for activated in self._activated:
                activated.sock.close()

    async def _open_spool_and_run(self, state_dir: Path, metrics: Metrics, started: float) -> int:
        try:
            await asyncio.to_thread(prepare_state_dir, state_dir)
            # Before the spool is opened: a second daemon on this state dir stops here.
            lock = await asyncio.to_thread(StateLock.acquire, state_dir, "forwarder run")
        except StateDirError as exc:
            log.error("startup_failed", error=str(exc))
            return 1
        except OSError as exc:
            log.error("startup_failed", error=f"state.dir {state_dir}: {_reason(exc)}")
            return 1
        try:
            return await self._open_spool_locked(state_dir, metrics, started)
        finally:
            lock.release()  # after the spool is closed and the PID file removed

    async def _open_spool_locked(self, state_dir: Path, metrics: Metrics, started: float) -> int:
        cfg = self.config
        try:
            spool = await Spool.open(
                state_dir,
                max_bytes=cfg.queue.max_disk_bytes,
                group_window_s=cfg.queue.group_commit_ms / 1000,
                on_commit=metrics.spool_commit.observe,
            )
        except (OSError, SpoolError, sqlite3.Error) as exc:
            log.error("startup_failed", error=f"state.dir {state_dir}: {_reason(exc)}")
            return 1
        if spool.moved_aside is not None:
            log.error(
                "spool_moved_aside",
                path=str(spool.moved_aside),
                reason=spool.moved_aside_reason,
                action="kept for inspection; a fresh spool is used"
                + ("" if spool.recovery is None else ", holding what could be read of it"),
            )
        if spool.recovery is not None:
            _log_recovery(spool.recovery)
        self._spool = spool
        try:
            return await self._serve(spool, metrics, started)
        finally:
            await spool.close()

    async def _serve(self, spool: Spool, metrics: Metrics, started: float) -> int:
        cfg = self.config
        state_dir = cfg.state.path
        default = cfg.remote.default_account
        durable = cfg.queue.mode == "durable"
        try:
            await self._import_pending_file(state_dir, spool, default)
        except (OSError, sqlite3.Error, SpoolError) as exc:  # the file still holds them
            log.error("startup_failed", error=f"cannot move the pending file into the spool: {exc}")
            return 1
        try:
            # Above every number given out before, and above the spool's positions (15.1).
            numbers = await asyncio.to_thread(EventNumbers.open, state_dir, floor=spool.max_seq + 1)
            # Durable: the spool's positions are the numbers from here on. Memory: rows added
            # while running (`forwarder dlq replay`) are numbered by position, above the
            # counter's block.
            await spool.lift_seq(numbers.next if durable else numbers.ceiling)
        except (NumbersError, sqlite3.Error, SpoolError) as exc:
            log.error("startup_failed", error=f"state.dir {state_dir}: event numbers: {exc}")
            return 1
        self.numbers = numbers
        self.status = status = StatusBook(
            retention_s=cfg.state.outcome_retention_s,
            max_count=cfg.state.outcome_max_count,
            durable=durable,
        )
        status.queue, status.spool = self.queue, spool
        self.backlog = backlog = Backlog(
            self.queue,
            spool,
            durable=durable,
            status=status if durable else None,
            numbers=numbers if durable else None,
        )
        backlog.throttle = spool.throttle = self.log_throttle
        restored = 0
        if not durable:
            # What the last stop saved comes first, ahead of anything new (beyond the bound).
            restored = await backlog.replay_all()
        if restored or spool.depth:
            log.info("spool_replay", in_memory=restored, on_disk=backlog.on_disk_only)

        self._state = IntakeState(
            queue=self.queue,
            stats=self.stats,
            metrics=metrics,
            max_batch=cfg.intake.max_batch,
            max_body_bytes=cfg.intake.max_body_bytes,
            accounts=self.accounts,
            admit=backlog.admit if durable else None,
            not_ready_reason=self._not_ready_reason,
            stats_extra=self._stats_extra,
            auth_token=self._intake_token.secret if self._intake_token else None,
            body_timeout_s=cfg.intake.body_timeout_s,
            drop_in_answer=cfg.intake.drop_in_answer,
            numbers=None if durable else numbers,
            status=status,
            throttle=self.log_throttle,
        )
        try:
            # Reads the CA files: off the event loop. Checked at load; it could change since.
            tls = await asyncio.to_thread(make_ssl_context, cfg.remote.ca_bundle)
        except OSError as exc:  # ssl.SSLError is one too
            log.error("startup_failed", error=f"remote.ca_bundle: {_reason(exc)}")
            return 1
        # One session for every account: the lanes' concurrency limits bound the connections.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=cfg.remote.timeout_s, connect=cfg.remote.connect_timeout_s
            ),
            # Verified TLS always (make_ssl_context); no proxies from the environment.
            connector=aiohttp.TCPConnector(limit=0, ssl=tls),
            headers={"User-Agent": USER_AGENT},
            trust_env=False,
        )
        self._dispatcher = Dispatcher(
            self.queue,
            outcomes=backlog,
            stats=self.stats,
            latency=metrics.latency,
            status=status,
        )
        for account in self.accounts.configured.values():
            self._add_lane(account)
        lanes = self._dispatcher.lanes
        self.held = held = HeldEvents(
            self.queue,
            backlog,
            self.stats,
            max_events=cfg.queue.held_max_events,
            max_age_s=cfg.queue.held_max_age_s,
            has_lane=lanes.__contains__,
            durable=durable,
        )
        held.on_room = backlog.wake
        backlog.kept_out = held.full
        held.start()  # the replayed events of accounts without a lane leave the queue now
        if len(held):
            log.warning(
                "events_held",
                accounts=held.view(),
                reason="no such account configured (or a client key not presented yet)",
                max_events=held.max_events,
                max_age_s=held.max_age_s,
            )
        _ensure_fd_room(cfg.intake.max_connections)
        runner = IntakeRunner(
            create_app(self._state), self.connections, shutdown_timeout=HANDLER_GRACE_S
        )
        exit_code = 0
        drained = True
        saved = 0
        backlog.start()
        self._dispatcher.start()
        status.start()
        pid_written = False
        try:
            await runner.setup()
            await self._start_sites(runner)
            await asyncio.to_thread(_write_pid, state_dir)
            pid_written = True
            self.ready.set()
            self.notifier.ready(self._status_line())
            self._status_task = asyncio.create_task(self._report_status(), name="sd-status")
            self._sweep_task = asyncio.create_task(self._sweep_clients(), name="client-sweep")
            log.info(
                "started",
                listening=self.addresses,
                accounts={
                    name: {"base_url": a.base_url, "api_key_source": a.key_source}
                    for name, a in self.accounts.configured.items()
                },
                default_account=default,
                queue_mode=cfg.queue.mode,
                concurrency=cfg.remote.concurrency or "adaptive",
                queue_max_events=cfg.queue.max_events,
                queue_max_bytes=cfg.queue.max_bytes,
                pending_restored=restored,
                spool_events=spool.depth,
                socket_activated=bool(self._activated),
                intake_token=self._intake_token.source if self._intake_token else "not required",
                watchdog_s=watchdog_interval(),
            )
            await self._stop.wait()
            self._shutting_down = True
            self._state.accepting = False
            # The drain ends early enough for the save to finish before systemd's SIGKILL.
            drain_s = drain_timeout_s(
                self.config.shutdown.timeout_s, stop_timeout_s(), reserve_s=STOP_RESERVE_S
            )
            self.notifier.stopping(f"draining for up to {drain_s:.0f}s; {self._status_line()}")
            log.info(
                "stopping",
                queued=len(self.queue),
                in_flight=self.queue.in_delivery,
                on_disk_only=backlog.on_disk_only,
                drain_timeout_s=drain_s,
            )
            drained = await self._dispatcher.drain(drain_s, self._force)
        except StartupError as exc:
            log.error("startup_failed", error=str(exc))
            exit_code = 1
        finally:
            self._shutting_down = True
            self._state.accepting = False
            for task in (self._status_task, self._sweep_task):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await backlog.stop()
            await status.stop()
            leftovers = await self._dispatcher.stop()
            leftovers += await held.stop()
            saved = await self._save(backlog, leftovers)
            await runner.cleanup()
            self._remove_unix_socket()
            if pid_written:
                await asyncio.to_thread(_remove_pid, state_dir)
            await self._session.close()
        self.log_throttle.close()  # the counts of lines held back go out before the summary
        log.info(
            "stopped",
            drained=drained,
            saved_pending=saved,
            spool_events=spool.depth,
            uptime_s=round(time.monotonic() - started, 3),
            **self.stats.counters(),
        )
        flush_logs()  # the summary line is out before the process is
        return exit_code

    async def _import_pending_file(self, state_dir: Path, spool: Spool, default: str) -> None:
        """A `pending.jsonl` from an older version goes into the spool: one replay path."""
        pending = await asyncio.to_thread(load_pending, state_dir)
        if pending.events:
            events = [
                e if e.account else dataclasses.replace(e, account=default) for e in pending.events
            ]
            await spool.append(events, force=True)
        if pending.events or pending.damaged_lines:
            log.info(
                "pending_file_imported",
                count=len(pending.events),
                damaged_lines=pending.damaged_lines,
            )
        # Removed only once the spool has them committed.
        await asyncio.to_thread(remove_pending, state_dir)

    async def _save(self, backlog: Backlog, leftovers: list[tuple[Event, int]]) -> int:
        """Spool the events that are in memory only; the journal is the last resort."""
        unsaved = [event for event, spool_seq in leftovers if not spool_seq]
        if not unsaved:
            return 0
        try:
            if self.numbers is not None:  # their rows' positions must be numbers never given
                await self.numbers.wait()
                await backlog.spool.lift_seq(self.numbers.next)
            await backlog.save(leftovers)
        except (OSError, sqlite3.Error, SpoolError) as exc:
            # Disk full or gone: the journal is the last place left, so the events are not lost
            # without a trace (they can be re-sent from these lines by hand).
            log.error(
                "pending_unsaved",
                error=str(exc),
                count=len(unsaved),
                events=[event.to_dict() for event in unsaved],
            )
            return 0
        log.info("pending_saved", count=len(unsaved), path=str(backlog.spool.path))
        return len(unsaved)

    async def _start_sites(self, runner: web.AppRunner) -> None:
        if self._activated:
            # Passed by systemd (forwarder.socket): already bound, with systemd's modes and
            # owners; connections made while we restarted wait in their backlog.
            for activated in self._activated:
                await web.SockSite(runner, activated.sock).start()
                self.addresses.append(activated.address)
            return
        intake = self.config.intake
        tcp = intake.tcp_address
        if tcp is not None:
            host, port = tcp
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {intake.http_listen}: {exc.strerror}"
                ) from None
            # Read the bound addresses back: with port 0 the kernel picked the port.
            for addr in runner.addresses:
                if isinstance(addr, tuple):
                    self.addresses.append(f"http://{_host_for_url(addr[0])}:{addr[1]}")
        if intake.unix_socket:
            path = intake.unix_socket
            # Blocking file-system work (and maybe a group lookup): off the event loop.
            sock = await asyncio.to_thread(
                _bind_unix_socket, path, intake.unix_socket_mode, intake.unix_socket_group
            )
            try:
                await web.SockSite(runner, sock).start()
            except BaseException:
                sock.close()
                raise
            self.addresses.append(f"unix:{path}")

    def _remove_unix_socket(self) -> None:
        path = self.config.intake.unix_socket
        # A socket systemd passed is systemd's to remove.
        if path and f"unix:{path}" in self.addresses and not self._activated:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _changed_keys(old: Config, new: Config) -> list[str]:
    """The `section.key` names whose values differ (accounts compared as whole tables)."""
    changed: list[str] = []
    for section in dataclasses.fields(old):
        before, after = getattr(old, section.name), getattr(new, section.name)
        if section.name == "accounts":
            changed += [
                f"accounts.{name}"
                for name in sorted({*before, *after})
                if before.get(name) != after.get(name)
            ]
            continue
        for item in dataclasses.fields(before):
            if getattr(before, item.name) != getattr(after, item.name):
                changed.append(f"{section.name}.{item.name}")
    return changed


def _ensure_fd_room(max_connections: int) -> None:
    """Raise the soft limit on open files so `max_connections` fit (up to the hard limit).

    systemd gives services a soft limit of 1024; past it accept() fails with EMFILE before the
    connection cap is reached. Raising the soft limit up to the hard one needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    if target < wanted:
        log.warning(
            "open_files_limit_low",
            limit=target,
            max_connections=max_connections,
            action="lower intake.max_connections or raise LimitNOFILE=",
        )


def _log_recovery(recovery: Recovery) -> None:
    """One line for what was brought over from a damaged spool; an error if not everything."""
    fields = recovery.to_dict()
    fields["action"] = (
        "readable events are sent first; rows that are no events become dead letters (damaged)"
        if recovery.complete
        else f"the rest is not readable; see: forwarder spool inspect {recovery.source}"
    )
    (log.warning if recovery.complete else log.error)("spool_recovered", **fields)


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _write_pid(state_dir: Path) -> None:
    # For `forwarder reload`: the PID of the daemon serving this state directory.
    replace_state_file(state_dir / PID_FILE, f"{os.getpid()}\n".encode("ascii"))


def _remove_pid(state_dir: Path) -> None:
    path = state_dir / PID_FILE
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        if int(read_state_file(path).decode("ascii")) == os.getpid():
            path.unlink()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# Pending connections the kernel holds for a listener (aiohttp's default).
LISTEN_BACKLOG = 128
# How long the stale-socket probe waits for a listener to take its connection.
SOCKET_PROBE_S = 1.0


def _bind_unix_socket(path: str, mode: int, group: str) -> socket.socket:
    """A listening Unix socket at `path` with `mode` and `group` ("" keeps ours); StartupError.

    The mode and group are set between bind() and listen(): until listen() every connection is
    refused, so no client can get in through a wider default mode, and no umask is touched.
    """
    _clear_stale_socket(path)
    try:
        gid = resolve_group(group) if group else -1
    except ValueError as exc:
        raise StartupError(f"intake.unix_socket_group: {exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            raise StartupError(f"cannot listen on {path}: {_reason(exc)}") from None
        try:
            if gid >= 0:
                try:
                    os.chown(path, -1, gid, follow_symlinks=False)
                except OSError as exc:
                    raise StartupError(
                        f"intake.unix_socket_group: cannot give {path} to group {group}: "
                        f"{_reason(exc)} (the service's user must be root or in that group)"
                    ) from None
            try:
                os.chmod(path, mode)
            except OSError as exc:
                raise StartupError(
                    f"intake.unix_socket_mode: cannot set the mode of {path}: {_reason(exc)}"
                ) from None
        except StartupError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # ours, just bound: not left behind with the wrong owner
            raise
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse anything else at that path.

    Only a socket nobody accepts connections on is removed. A symbolic link is never followed
    (lstat) nor removed; a regular file, a directory or a live socket are refused by name.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot listen on {path}: {_reason(exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StartupError(
            f"cannot listen on {path}: it is a symbolic link (not followed, not removed)"
        )
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket (not removed)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(SOCKET_PROBE_S)
    try:
        probe.connect(path)
    except TimeoutError:
        pass  # a listener too busy to take the probe is still a listener
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise StartupError(f"cannot listen on {path}: {_reason(exc)}") from None
        os.unlink(path)  # nobody listens: a stale file left by a dead process
        return
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {path}: already in use by another process")
