"""The daemon's lifecycle: start → serve → (signal) → stop intake → drain → save → stop.

`Daemon._start` reads top to bottom as the start order. Each resource is set up and its
teardown pushed on one `AsyncExitStack` right after, so the stop order is the start order
reversed by construction:

1. systemd's listen sockets (closed last), the intake token and the exposure check;
2. the systemd notifier and watchdog (from the start: a slow replay must not look like a hang);
3. the state directory, checked and locked (a second daemon stops here);
4. with `fleet.redis_url`, the fleet's Redis client and heartbeat (forwarder/fleet/host.py),
   whose budgets the lanes get: before the event log, which a shared queue keeps on it, so it
   is there for the log's release at a stop;
5. the event log (`queue.mode`'s backend from `storage.log.BACKENDS`), with what the last stop
   saved replayed; the `stopped` summary;
6. the HTTP client session (one for every account);
7. intake's app and runner (not listening yet) and the PID file; they go after the save;
8. the dispatcher with a lane per account, held events, and delivery started (its teardown
   stops delivery and releases what is left to the event log);
9. intake's sites bound (systemd's sockets or ours): the daemon is ready;
10. systemd status reporting and the idle-client sweep;
11. intake stops taking work (answers 503, apps keep their events): the first thing at a stop.

Between start and stop, `_serve` waits for a signal and drains for up to `shutdown.timeout_s`
(a second signal stops at once). The steps' details live beside this module (the event log's
in `storage/`): `accountlanes.py` (the session, the dispatcher and its lanes),
`listeners.py` (intake's state, sockets, PID file), `reload.py` and `view.py` (stats, gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time

import aiohttp
import structlog

from forwarder.config.schema import Config, ConfigError
from forwarder.config.validate import check_exposure
from forwarder.daemon import listeners
from forwarder.daemon.accountlanes import AccountLanes, client_session
from forwarder.daemon.listeners import StartupError, reason
from forwarder.daemon.reload import Loader, reload
from forwarder.daemon.view import StatusView
from forwarder.delivery.dispatcher import Dispatcher
from forwarder.fleet.host import FleetHost
from forwarder.intake.accounts import Account, Accounts
from forwarder.intake.app import create_app
from forwarder.intake.guard import ConnectionGuard
from forwarder.intake.runner import IntakeRunner
from forwarder.intake.state import IntakeState
from forwarder.ops.credentials import ApiKey, resolve_intake_token
from forwarder.ops.logs import flush_logs, set_secrets
from forwarder.ops.logthrottle import LogThrottle
from forwarder.ops.metrics import Metrics, Stats
from forwarder.ops.statedir import StateDirError, StateLock, prepare_state_dir
from forwarder.ops.systemd import (
    ListenSocket,
    Notifier,
    Watchdog,
    drain_timeout_s,
    listen_sockets,
    stop_timeout_s,
    watchdog_interval,
)
from forwarder.storage.held import HeldEvents
from forwarder.storage.log import EventLog, LogDeps, LogError, open_event_log
from forwarder.storage.queue import EventQueue

log = structlog.get_logger("forwarder.daemon")
# aiohttp's grace for requests still being answered when the listeners close.
HANDLER_GRACE_S = 2.0
# How often STATUS= goes to systemd.
STATUS_EVERY_S = 5.0
# Kept between the drain's end and systemd's SIGKILL, for saving and closing.
STOP_RESERVE_S = 5.0

__all__ = ["Daemon", "Loader", "StartupError"]


@dataclasses.dataclass
class _Stopped:
    """What the `stopped` summary line reports, filled in as the stop goes."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    delivering: bool = False  # the summary is for a daemon that got as far as delivering
    drained: bool = True
    saved: int = 0


class Daemon:
    """One forwarder process: intake, queue, dispatcher and their orderly shutdown."""

    def __init__(
        self, config: Config, accounts: dict[str, Account], *, loader: Loader | None = None
    ) -> None:
        self.config = config
        self._loader = loader
        self.stats = Stats()
        self.queue: EventQueue = EventQueue(
            config.queue.max_events,
            max_bytes=config.queue.max_bytes,
            ordered=config.remote.per_recipient_order,
        )
        self.lanes = AccountLanes(self)
        self.accounts = Accounts(
            accounts,
            default=config.remote.default_account,
            accept_client_keys=config.intake.accept_client_keys,
            client_template=accounts.get(config.remote.default_account),
            on_new_client=self.lanes.add_client_lane,
            on_clients_freed=self.lanes.free_clients,
            busy=self.lanes.client_busy,
        )
        self.view = StatusView(self)
        self.addresses: list[str] = []
        self.ready = asyncio.Event()
        self.reloads = 0
        self.shutting_down = False
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._reload_task: asyncio.Task[bool] | None = None
        self._dispatcher: Dispatcher | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fleet: FleetHost | None = None
        self._state: IntakeState | None = None
        self._metrics: Metrics | None = None
        self._stopped = _Stopped()
        self.log: EventLog | None = None
        self.held: HeldEvents | None = None
        self.notifier = Notifier.from_env()
        self.activated: list[ListenSocket] = []
        self.intake_token: ApiKey | None = None
        intake = config.intake
        # One throttle for every log line a request can cause (logthrottle.py), flushed at stop.
        self.log_throttle = LogThrottle()
        self.connections: ConnectionGuard = ConnectionGuard(
            max_connections=intake.max_connections,
            header_timeout_s=intake.header_timeout_s,
            keepalive_timeout_s=intake.keepalive_timeout_s,
            write_timeout_s=intake.write_timeout_s,
            throttle=self.log_throttle,
        )

    # --- signals and requests -------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful stop (as SIGTERM does); a second call stops without draining."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    def request_reload(self) -> asyncio.Task[bool]:
        """Re-read the configuration and apply it (as SIGHUP does); reloads never overlap."""
        previous = self._reload_task
        if previous is not None and not previous.done():
            return previous
        self._reload_task = asyncio.create_task(self.reload(), name="config-reload")
        return self._reload_task

    async def reload(self) -> bool:
        """Apply a new configuration; a bad one is refused and the running one stays."""
        return await reload(self, self._loader)

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            log.warning("second_signal", signal=signal.Signals(signum).name, action="stop now")
        else:
            log.info("signal", signal=signal.Signals(signum).name, action="graceful stop")
        self.request_stop()

    def _on_reload_signal(self) -> None:
        log.info("signal", signal="SIGHUP", action="reload configuration")
        self.request_reload()

    # --- run: start, serve, stop ----------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    await self._start(stack)
                except StartupError as exc:
                    log.error("startup_failed", error=str(exc))
                    return 1  # what was started is stopped by the stack, in reverse
                await self._serve()
            return 0
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if self._reload_task is not None:
                self._reload_task.cancel()
                await asyncio.gather(self._reload_task, return_exceptions=True)

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Set up every resource in start order; each pushes its teardown right after."""
        cfg = self.config
        stopped = self._stopped = _Stopped()
        metrics = self._metrics = Metrics(
            self.stats,
            self.view.gauges,
            self.view.account_views,
            self.view.counters,
            not_ready=self.view.not_ready_conditions,
        )

        # 1. systemd socket activation: serve on the sockets it passed instead of binding.
        try:
            self.activated = listen_sockets()
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        stack.callback(_close_sockets, self.activated)
        try:
            # A token file is read: off the event loop. Refused before anything is bound.
            self.intake_token = await asyncio.to_thread(resolve_intake_token, cfg)
            check_exposure(
                listeners.exposed_listeners(self.activated, cfg), self.intake_token is not None
            )
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        set_secrets(self.lanes.secrets())

        # 2. systemd: the notifier, and the watchdog from the start.
        stack.callback(self.notifier.close)
        interval = watchdog_interval()
        if interval:
            watchdog = Watchdog(self.notifier, interval, self._healthy)
            watchdog.start()
            stack.push_async_callback(watchdog.stop)

        # 3. The state directory, locked before the event log is opened.
        state_dir = cfg.state.path
        try:
            await asyncio.to_thread(prepare_state_dir, state_dir)
            lock = await asyncio.to_thread(StateLock.acquire, state_dir, "forwarder run")
        except StateDirError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"state.dir {state_dir}: {reason(exc)}") from None
        stack.callback(lock.release)

        # 4. The fleet (fleet.redis_url): Redis, the heartbeat, the accounts' shared budgets.
        if cfg.fleet.enabled:
            try:
                self.fleet = await FleetHost.start(cfg, in_delivery=lambda: self.queue.in_delivery)
            except ConfigError as exc:
                raise StartupError(str(exc)) from None
            stack.push_async_callback(self.fleet.stop)
            set_secrets(self.lanes.secrets())  # the Redis password is redacted from here on

        # 5. The event log, with the last stop's events; closed after everything that uses it.
        try:
            events = self.log = await open_event_log(
                cfg,
                LogDeps(self.queue, self.log_throttle, metrics.spool_commit.observe, self.fleet),
            )
        except LogError as exc:
            raise StartupError(str(exc)) from None
        stack.push_async_callback(events.close)
        stack.push_async_callback(self._log_stopped, stopped)

        # 6. One HTTP session for every account: the lanes' concurrency limits bound it.
        self._session = await client_session(cfg)
        stack.push_async_callback(self._session.close)

        # 7. Intake's app and runner (not listening yet), and the PID file for `forwarder reload`.
        self._state = listeners.intake_state(self, metrics, events)
        listeners.ensure_fd_room(cfg.intake.max_connections)
        runner = IntakeRunner(
            create_app(self._state), self.connections, shutdown_timeout=HANDLER_GRACE_S
        )
        await runner.setup()
        await asyncio.to_thread(listeners.write_pid, state_dir)
        stack.push_async_callback(self._close_intake, runner)

        # 8. Delivery: a lane per account, events held without one, and the pumps started.
        dispatcher = self.lanes.start_delivery(metrics, events)
        stopped.delivering = True
        stack.push_async_callback(self._stop_delivery, dispatcher, stopped)

        # 9. Intake's sites: from here apps' events are taken.
        self.addresses += await listeners.start_sites(runner, self.activated, cfg.intake)
        self.ready.set()
        self.notifier.ready(self.view.status_line())

        # 10. Background work while serving.
        for work, name in (
            (self._report_status, "sd-status"),
            (self.lanes.sweep_clients, "client-sweep"),
        ):
            stack.push_async_callback(_cancel, asyncio.create_task(work(), name=name))

        # 11. The first thing at a stop: intake stops taking work.
        stack.callback(self._stop_taking_work)
        log.info("started", **self.view.started(events.restored))

    async def _serve(self) -> None:
        """Serve until a signal, then drain (bounded; a second signal stops at once)."""
        await self._stop.wait()
        self._stop_taking_work()
        assert self._dispatcher is not None
        assert self.log is not None
        # The drain ends early enough for the save to finish before systemd's SIGKILL.
        drain_s = drain_timeout_s(
            self.config.shutdown.timeout_s, stop_timeout_s(), reserve_s=STOP_RESERVE_S
        )
        self.notifier.stopping(f"draining for up to {drain_s:.0f}s; {self.view.status_line()}")
        log.info(
            "stopping",
            queued=len(self.queue),
            in_flight=self.queue.in_delivery,
            on_disk_only=self.log.on_disk_only,
            drain_timeout_s=drain_s,
        )
        self._stopped.drained = await self._dispatcher.drain(drain_s, self._force)

    # --- the steps of the start, and their teardowns --------------------------------------------

    async def _close_intake(self, runner: IntakeRunner) -> None:
        """Close intake's listeners (after the save: until then apps get 503), the PID file."""
        await runner.cleanup()
        listeners.remove_unix_socket(self.config.intake, self.addresses, bool(self.activated))
        await asyncio.to_thread(listeners.remove_pid, self.config.state.path)

    async def _stop_delivery(self, dispatcher: Dispatcher, stopped: _Stopped) -> None:
        """Stop delivery and release what is left to the event log (saved for the next start)."""
        assert self.log is not None
        assert self.held is not None
        await self.log.stop()
        leftovers = await dispatcher.stop()
        leftovers += await self.held.stop()
        stopped.saved = await self.log.release(leftovers)

    def _stop_taking_work(self) -> None:
        self.shutting_down = True
        if self._state is not None:
            self._state.accepting = False

    async def _log_stopped(self, stopped: _Stopped) -> None:
        """The one summary line, once everything after the event log is closed."""
        if not stopped.delivering:
            return
        self.log_throttle.close()  # the counts of lines held back go out before the summary
        log.info(
            "stopped",
            drained=stopped.drained,
            saved_pending=stopped.saved,
            spool_events=self.log.stored().events if self.log else 0,
            uptime_s=round(time.monotonic() - stopped.started, 3),
            **self.stats.counters(),
        )
        flush_logs()  # the summary line is out before the process is

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            why = self.view.not_ready_reason()
            self.notifier.status(self.view.status_line(prefix=f"{why}; " if why else ""))
            if self._dispatcher is not None:
                # Per-account delivered-per-minute rates need samples even when nobody reads.
                for lane in self._dispatcher.lanes.values():
                    lane.delivered_rate.observe(lane.delivered)

    def _healthy(self) -> bool:
        """For the watchdog: the event loop turns (this runs) and every lane still pulls."""
        return self._dispatcher is None or self._dispatcher.healthy()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _close_sockets(activated: list[ListenSocket]) -> None:
    for passed in activated:
        passed.sock.close()
