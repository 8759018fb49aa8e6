"""The daemon's lifecycle: start → serve → (signal) → stop intake → drain → save → stop.

Teardown order matters and is the reverse of start: intake stops admitting first (apps get 503
and keep their events), delivery drains for up to `shutdown.timeout_s`, whatever is left is saved
to `pending.jsonl`, then the listeners and the HTTP session close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from forwarder.config import Config
from forwarder.credentials import ApiKey
from forwarder.deadletter import DeadLetterWriter
from forwarder.dispatcher import Dispatcher
from forwarder.events import Event
from forwarder.intake import IntakeState, create_app
from forwarder.queue import EventQueue, load_pending, remove_pending, save_pending
from forwarder.remote import USER_AGENT, RemoteClient
from forwarder.telemetry import Metrics, Stats

log = structlog.get_logger("forwarder.daemon")
# aiohttp's grace for requests still being answered when the listeners close.
HANDLER_GRACE_S = 2.0


class StartupError(Exception):
    """The daemon cannot start (a listener cannot be bound, the state dir is unusable...)."""


class Daemon:
    """One forwarder process: intake, queue, dispatcher and their orderly shutdown."""

    def __init__(self, config: Config, api_key: ApiKey) -> None:
        self.config = config
        self._api_key = api_key
        self.stats = Stats()
        self.queue = EventQueue(config.queue.max_events)
        self.addresses: list[str] = []
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._shutting_down = False
        self._dispatcher: Dispatcher | None = None
        self._state: IntakeState | None = None

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
        if self._dispatcher is not None and self._dispatcher.paused:
            return f"delivery paused: {self._dispatcher.pause_reason}"
        return ""

    def _gauges(self) -> dict[str, tuple[str, float]]:
        d = self._dispatcher
        return {
            "queue_depth": ("Events waiting in the queue.", len(self.queue)),
            "queue_capacity": ("queue.max_events.", self.queue.max_events),
            "in_flight": ("Events being delivered now.", d.in_flight if d else 0),
            "delivery_paused": ("1 while the remote refuses the key.", int(bool(d and d.paused))),
            "ready": ("1 when /readyz answers 200.", int(not self._not_ready_reason())),
        }

    def _stats_extra(self) -> dict[str, Any]:
        d = self._dispatcher
        return {
            "in_flight": d.in_flight if d else 0,
            "delivery": {
                "paused": bool(d and d.paused),
                "pause_reason": d.pause_reason if d else "",
                "workers": d.workers_alive if d else 0,
                "concurrency": self.config.remote.concurrency,
            },
        }

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            return await self._run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

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
        try:
            await asyncio.to_thread(_prepare_state_dir, state_dir)
            pending = await asyncio.to_thread(load_pending, state_dir)
        except OSError as exc:
            log.error("startup_failed", error=f"state.dir {state_dir}: {exc.strerror or exc}")
            return 1
        # Pending events go in first, ahead of anything new, and may exceed the bound.
        restored = self.queue.restore(pending.events)
        if pending.events or pending.damaged_lines:
            log.info("pending_restored", count=restored, damaged_lines=pending.damaged_lines)
        try:
            # Removed only now that they are queued; a stop saves whatever is left of them again.
            await asyncio.to_thread(remove_pending, state_dir)
        except OSError as exc:  # the file still holds them: nothing is lost by not starting
            log.error("startup_failed", error=f"cannot remove the pending file: {exc}")
            return 1

        metrics = Metrics(self.stats, self._gauges)
        self._state = IntakeState(
            queue=self.queue,
            stats=self.stats,
            metrics=metrics,
            max_batch=cfg.intake.max_batch,
            max_body_bytes=cfg.intake.max_body_bytes,
            not_ready_reason=self._not_ready_reason,
            stats_extra=self._stats_extra,
        )
        dead_letters = DeadLetterWriter(state_dir)
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=cfg.remote.timeout_s, connect=cfg.remote.connect_timeout_s
            ),
            connector=aiohttp.TCPConnector(limit=cfg.remote.concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        self._dispatcher = Dispatcher(
            self.queue,
            RemoteClient(session, cfg.remote.base_url, self._api_key.secret),
            cfg.retry,
            concurrency=cfg.remote.concurrency,
            auth_retry_s=cfg.remote.auth_retry_s,
            dead_letters=dead_letters,
            stats=self.stats,
            latency=metrics.latency,
        )
        runner = web.AppRunner(
            create_app(self._state),
            access_log=None,
            shutdown_timeout=HANDLER_GRACE_S,
        )
        exit_code = 0
        drained = True
        leftovers: list[Event] = []
        dead_letters.start()
        self._dispatcher.start()
        try:
            await runner.setup()
            await self._start_sites(runner)
            self.ready.set()
            log.info(
                "started",
                listening=self.addresses,
                base_url=cfg.remote.base_url,
                api_key_source=self._api_key.source,
                concurrency=cfg.remote.concurrency,
                queue_max_events=cfg.queue.max_events,
                pending_restored=restored,
            )
            await self._stop.wait()
            self._shutting_down = True
            self._state.accepting = False
            log.info(
                "stopping",
                queued=len(self.queue),
                in_flight=self._dispatcher.in_flight,
                drain_timeout_s=cfg.shutdown.timeout_s,
            )
            drained = await self._dispatcher.drain(cfg.shutdown.timeout_s, self._force)
        except StartupError as exc:
            log.error("startup_failed", error=str(exc))
            exit_code = 1
        finally:
            self._shutting_down = True
            self._state.accepting = False
            leftovers = await self._dispatcher.stop()
            if leftovers:
                await self._save(state_dir, leftovers)
            await runner.cleanup()
            self._remove_unix_socket()
            await session.close()
            await dead_letters.close()
        log.info(
            "stopped",
            drained=drained,
            saved_pending=len(leftovers),
            uptime_s=round(time.monotonic() - started, 3),
            **self.stats.counters(),
        )
        return exit_code

    async def _save(self, state_dir: Path, events: list[Event]) -> None:
        try:
            path = await asyncio.to_thread(save_pending, state_dir, events)
        except OSError as exc:
            # Disk full or gone: the journal is the last place left, so the events are not lost
            # without a trace (they can be re-sent from these lines by hand).
            log.error(
                "pending_unsaved",
                error=str(exc),
                count=len(events),
                events=[event.to_dict() for event in events],
            )
            return
        log.info("pending_saved", count=len(events), path=str(path))

    async def _start_sites(self, runner: web.AppRunner) -> None:
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
            await asyncio.to_thread(_clear_stale_socket, path)
            unix_site = web.UnixSite(runner, path)
            # The socket is created with the umask's permissions; narrow it before bind, not after.
            old_umask = os.umask(0o777 & ~intake.unix_socket_mode)
            try:
                await unix_site.start()
            except OSError as exc:
                raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
            finally:
                os.umask(old_umask)
            os.chmod(path, intake.unix_socket_mode)
            self.addresses.append(f"unix:{path}")

    def _remove_unix_socket(self) -> None:
        path = self.config.intake.unix_socket
        if path and f"unix:{path}" in self.addresses:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _prepare_state_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    probe = path / ".write-test"
    probe.write_bytes(b"")
    probe.unlink()


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse anything else at that path."""
    try:
        info = os.lstat(path)  # lstat: a symlink is never followed, only refused
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {path}: another process is serving on it")
