"""Intake in the daemon: its app's state, its sockets and the PID file, set up and removed.

Sockets come from systemd (socket activation) or are bound here: TCP by aiohttp, the Unix
socket with its mode and group set before it listens, a stale socket file of a dead process
removed and anything else at that path refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from forwarder.config.address import resolve_group
from forwarder.config.schema import Config, IntakeConfig
from forwarder.intake.state import IntakeState
from forwarder.ops.metrics import Metrics
from forwarder.ops.statedir import read_state_file, replace_state_file
from forwarder.ops.systemd import ListenSocket
from forwarder.storage.log import EventLog

if TYPE_CHECKING:
    from forwarder.daemon.lifecycle import Daemon

log = structlog.get_logger("forwarder.daemon")
PID_FILE = "forwarder.pid"
# File descriptors wanted besides intake's connections: listeners, the spool, the remote's
# connections, logs.
FD_RESERVE = 256
# Pending connections the kernel holds for a listener (aiohttp's default).
LISTEN_BACKLOG = 128
# How long the stale-socket probe waits for a listener to take its connection.
SOCKET_PROBE_S = 1.0


class StartupError(Exception):
    """The daemon cannot start (a listener cannot be bound, the state dir is unusable...)."""


def intake_state(daemon: Daemon, metrics: Metrics, events: EventLog) -> IntakeState:
    """What intake's app serves from: the event log, the accounts, limits and views."""
    cfg = daemon.config
    return IntakeState(
        queue=daemon.queue,
        stats=daemon.stats,
        metrics=metrics,
        max_batch=cfg.intake.max_batch,
        max_body_bytes=cfg.intake.max_body_bytes,
        accounts=daemon.accounts,
        log=events,
        not_ready_reason=daemon.view.not_ready_reason,
        stats_extra=daemon.view.stats_extra,
        ready_detail=daemon.view.ready_detail,
        auth_token=daemon.intake_token.secret if daemon.intake_token else None,
        body_timeout_s=cfg.intake.body_timeout_s,
        drop_in_answer=cfg.intake.drop_in_answer,
        numbers=events.intake_numbers,
        status=events.status,
        throttle=daemon.log_throttle,
    )


def exposed_listeners(activated: list[ListenSocket], config: Config) -> list[tuple[str, str]]:
    """The TCP listeners as (where, host), for `check_exposure`: systemd's, or ours."""
    if activated:
        return [
            (f"socket activation: {a.address} (fd {a.fd})", str(a.sock.getsockname()[0]))
            for a in activated
            if a.family in (socket.AF_INET, socket.AF_INET6)
        ]
    tcp = config.intake.tcp_address
    return [("intake.http_listen", tcp[0])] if tcp is not None else []


async def start_sites(
    runner: web.AppRunner, activated: list[ListenSocket], intake: IntakeConfig
) -> list[str]:
    """Serve intake on systemd's sockets, or bind its own; returns the addresses served."""
    addresses: list[str] = []
    if activated:
        # Passed by systemd (forwarder.socket): already bound, with systemd's modes and
        # owners; connections made while we restarted wait in their backlog.
        for passed in activated:
            await web.SockSite(runner, passed.sock).start()
            addresses.append(passed.address)
        return addresses
    tcp = intake.tcp_address
    if tcp is not None:
        host, port = tcp
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {intake.http_listen}: {exc.strerror}") from None
        # Read the bound addresses back: with port 0 the kernel picked the port.
        for addr in runner.addresses:
            if isinstance(addr, tuple):
                addresses.append(f"http://{_host_for_url(addr[0])}:{addr[1]}")
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
        addresses.append(f"unix:{path}")
    return addresses


def remove_unix_socket(intake: IntakeConfig, addresses: list[str], activated: bool) -> None:
    """Remove the Unix socket file we bound (a socket systemd passed is systemd's to remove)."""
    path = intake.unix_socket
    if path and f"unix:{path}" in addresses and not activated:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def ensure_fd_room(max_connections: int) -> None:
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


def reason(exc: BaseException) -> str:
    """An OS error's reason without its errno prefix (or the exception's text)."""
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def write_pid(state_dir: Path) -> None:
    """Write our PID for `forwarder reload`: the daemon serving this state directory."""
    replace_state_file(state_dir / PID_FILE, f"{os.getpid()}\n".encode("ascii"))


def remove_pid(state_dir: Path) -> None:
    """Remove the PID file if it is still ours."""
    path = state_dir / PID_FILE
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        if int(read_state_file(path).decode("ascii")) == os.getpid():
            path.unlink()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
            raise StartupError(f"cannot listen on {path}: {reason(exc)}") from None
        try:
            if gid >= 0:
                try:
                    os.chown(path, -1, gid, follow_symlinks=False)
                except OSError as exc:
                    raise StartupError(
                        f"intake.unix_socket_group: cannot give {path} to group {group}: "
                        f"{reason(exc)} (the service's user must be root or in that group)"
                    ) from None
            try:
                os.chmod(path, mode)
            except OSError as exc:
                raise StartupError(
                    f"intake.unix_socket_mode: cannot set the mode of {path}: {reason(exc)}"
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
        raise StartupError(f"cannot listen on {path}: {reason(exc)}") from None
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
            raise StartupError(f"cannot listen on {path}: {reason(exc)}") from None
        os.unlink(path)  # nobody listens: a stale file left by a dead process
        return
    finally:
        probe.close()
    raise StartupError(f"cannot listen on {path}: already in use by another process")
