"""systemd integration without libsystemd: readiness and status, the watchdog, socket activation.

All of it is a few lines of stdlib over documented, stable protocols:

* ``sd_notify``: newline-separated ``KEY=VALUE`` datagrams to the AF_UNIX socket named by
  ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). Without the variable every
  call is a no-op, so the daemon runs the same under systemd, in a terminal and in tests.
* The watchdog: ``$WATCHDOG_USEC`` asks for ``WATCHDOG=1`` more often than that; a daemon whose
  event loop is wedged (or whose delivery lanes died) stops pinging and systemd restarts it.
* Socket activation (``sd_listen_fds``): listening sockets passed as fds 3.. with
  ``$LISTEN_FDS``, ``$LISTEN_PID`` and ``$LISTEN_FDNAMES``.

systemd does not tell a service its ``TimeoutStopSec=``; the unit repeats it in
``Environment=FORWARDER_SYSTEMD_STOP_TIMEOUT_S=`` (read by :func:`stop_timeout_s`).

One module (just over 400 lines) for systemd's side of the daemon's life: the three protocols are
small and share the environment parsing. `PerMinute`, the rate the STATUS= line shows, is here
for that line; the lanes reuse it.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger("forwarder.systemd")

# sd_listen_fds(3): the first passed fd; 0, 1 and 2 stay stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
STOP_TIMEOUT_VAR = "FORWARDER_SYSTEMD_STOP_TIMEOUT_S"
# sd_notify field names are upper case (READY, STATUS, MONOTONIC_USEC, X_CUSTOM...).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
_DECIMAL = re.compile(r"[0-9]{1,19}")


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (abstract names starting with '@' handled); a no-op without it.

    ``enabled`` says whether a notify socket is configured (sends are attempted), not whether
    the last send arrived. Sends never raise: a failure is logged once (until a send works
    again) and reported by ``send`` returning False.
    """

    def __init__(self, address: str | None = None) -> None:
        """``address`` is a $NOTIFY_SOCKET value; None or "" makes a notifier that sends nothing."""
        self.address = address or ""
        self._target = _notify_target(self.address)
        self.enabled = self._target is not None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET`` in ``env`` (default ``os.environ``)."""
        environ = os.environ if env is None else env
        return cls(environ.get("NOTIFY_SOCKET"))

    def send(self, **fields: str) -> bool:
        """Send one datagram, e.g. ``send(READY="1", STATUS="...")``; True if it was sent."""
        if not self.enabled or not fields:
            return False
        lines: list[str] = []
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name):
                log.error("notify_bad_field", field=name, reason="sd_notify names are upper case")
                return False
            # A newline would end the field and start another one: a status text stays one line.
            flat = " ".join(str(value).splitlines())
            lines.append(f"{name}={flat}\n")
        data = "".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = self._connect()
            # A datagram to a local socket is sent whole or not at all, at once: no waiting.
            self._sock.send(data)
        except OSError as exc:
            # Reconnect next time: the manager may have re-created its socket (daemon-reexec).
            self._drop()
            if not self._failing:
                self._failing = True
                log.warning(
                    "notify_failed",
                    notify_socket=self.address,
                    fields=sorted(fields),
                    error=exc.strerror or str(exc),
                    action="the service manager misses updates until a send works again",
                )
            return False
        if self._failing:
            self._failing = False
            log.info("notify_recovered", notify_socket=self.address)
        return True

    def ready(self, status: str = "") -> None:
        """Startup (or a reload) is complete: READY=1, with an optional status line."""
        self.send(READY="1", **_status(status))

    def status(self, text: str) -> None:
        """A one-line status, shown by ``systemctl status``."""
        self.send(STATUS=text)

    def stopping(self, status: str = "") -> None:
        """A graceful stop has begun: STOPPING=1."""
        self.send(STOPPING="1", **_status(status))

    def reloading(self, status: str = "") -> None:
        """A reload has begun (Type=notify-reload); send :meth:`ready` when it is over.

        MONOTONIC_USEC lets the manager tell this reload from an earlier one's late messages.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING="1", MONOTONIC_USEC=str(usec), **_status(status))

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the start or stop timeout (EXTEND_TIMEOUT_USEC)."""
        self.send(EXTEND_TIMEOUT_USEC=str(max(0, round(seconds * 1_000_000))))

    def watchdog(self) -> None:
        """Keep-alive for WatchdogSec=: WATCHDOG=1."""
        self.send(WATCHDOG="1")

    def close(self) -> None:
        """Close the socket; later sends do nothing."""
        self.enabled = False
        self._drop()

    def _connect(self) -> socket.socket:
        assert self._target is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            sock.connect(self._target)
        except OSError:
            sock.close()
            raise
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _status(text: str) -> dict[str, str]:
    return {"STATUS": text} if text else {}


def _notify_target(address: str) -> str | None:
    """The address to connect to for a $NOTIFY_SOCKET value; None if there is none we can use."""
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # E.g. "vsock:CID:PORT" (a manager outside a VM): not needed for this daemon.
    log.warning("notify_socket_unsupported", notify_socket=address, action="not notifying")
    return None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec= in seconds from $WATCHDOG_USEC; None if unset, invalid or not for this process.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for (a forking parent may
    have left it behind for us).
    """
    environ = os.environ if env is None else env
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and _number(pid) != os.getpid():
        return None
    usec = _number(environ.get("WATCHDOG_USEC", ""))
    return usec / 1_000_000 if usec else None


class Watchdog:
    """Pings WATCHDOG=1 at half the interval while the event loop turns and `healthy()` says so.

    A blocked event loop stops the pings by itself (the task cannot run); a tick that comes later
    than half the interval is logged, as it means the manager may have waited past WatchdogSec=.
    """

    def __init__(self, notifier: Notifier, interval_s: float, healthy: Callable[[], bool]) -> None:
        """``interval_s`` is WatchdogSec= (see :func:`watchdog_interval`)."""
        if not interval_s > 0:
            raise ValueError(f"watchdog interval must be positive, not {interval_s!r}")
        self.notifier = notifier
        self.interval_s = interval_s
        self.healthy = healthy
        self.pings = 0
        self._unhealthy = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start pinging (the first ping goes out at once); a second call does nothing."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="systemd-watchdog")

    async def stop(self) -> None:
        """Stop pinging."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.interval_s / 2
        due = loop.time()
        while True:
            now = loop.time()
            late = now - due
            # Late by more than half the interval: more than WatchdogSec= since the last ping.
            if late > period:
                log.warning(
                    "watchdog_late_tick",
                    late_s=round(late, 3),
                    watchdog_interval_s=self.interval_s,
                    reason="the event loop was blocked or starved",
                )
            if self._is_healthy():
                self.notifier.watchdog()
                self.pings += 1
            # From now, not from `due`: after a stall, no burst of catch-up pings.
            due = now + period
            await asyncio.sleep(max(0.0, due - loop.time()))

    def _is_healthy(self) -> bool:
        try:
            healthy, reason = bool(self.healthy()), "the health check failed"
        except Exception as exc:  # a broken check is unhealthy, not a dead watchdog task
            healthy, reason = False, f"the health check raised {exc!r}"
        if not healthy and not self._unhealthy:
            log.warning(
                "watchdog_unhealthy",
                reason=reason,
                action="watchdog pings stop; systemd restarts the service after WatchdogSec=",
            )
        elif healthy and self._unhealthy:
            log.info("watchdog_healthy_again", action="watchdog pings resume")
        self._unhealthy = not healthy
        return healthy


@dataclass(frozen=True)
class ListenSocket:
    """A listening stream socket passed by systemd (socket activation)."""

    fd: int
    name: str  # from LISTEN_FDNAMES ("" if not given)
    family: int  # socket.AF_INET / AF_INET6 / AF_UNIX
    sock: socket.socket  # owns fd; non-blocking, close-on-exec

    @property
    def address(self) -> str:
        """As the daemon logs its listeners: http://127.0.0.1:8787, http://[::1]:8787, unix:/x."""
        name = self.sock.getsockname()
        if self.family == socket.AF_UNIX:
            if isinstance(name, bytes):  # Linux returns abstract names as bytes
                name = os.fsdecode(name)
            # The abstract namespace starts with NUL; systemd writes it as "@".
            return f"unix:@{name[1:]}" if name.startswith("\0") else f"unix:{name}"
        host, port = name[0], name[1]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


def listen_sockets(
    env: Mapping[str, str] | None = None, *, unset: bool = True
) -> list[ListenSocket]:
    """The listening sockets systemd passed (socket activation); [] if none are for this process.

    Only listening SOCK_STREAM sockets (TCP or Unix) are accepted: anything else at fds 3.. raises
    ValueError naming the fd, as does a malformed LISTEN_FDS or LISTEN_FDNAMES. With ``unset``
    the LISTEN_* variables are removed from the environment they were read from (``os.environ``
    by default), as sd_listen_fds(1) does, so child processes do not take them as theirs.
    """
    environ = os.environ if env is None else env
    try:
        return _listen_sockets(environ)
    finally:
        if unset and isinstance(environ, MutableMapping):
            for var in LISTEN_VARS:
                environ.pop(var, None)


def _listen_sockets(env: Mapping[str, str]) -> list[ListenSocket]:
    count_text = env.get("LISTEN_FDS")
    # Not set, or set for another process (our parent's, inherited): nothing is ours.
    if _number(env.get("LISTEN_PID", "")) != os.getpid() or count_text is None:
        return []
    count = _number(count_text)
    if count is None:
        raise ValueError(f"socket activation: LISTEN_FDS={count_text!r} is not a number of fds")
    names_text = env.get("LISTEN_FDNAMES")
    names = [""] * count if names_text is None else names_text.split(":")
    if count and len(names) != count:
        raise ValueError(
            f"socket activation: LISTEN_FDNAMES={names_text!r} has {len(names)} names "
            f"for {count} fds"
        )
    adopted: list[ListenSocket] = []
    try:
        for offset in range(count):
            adopted.append(_adopt(SD_LISTEN_FDS_START + offset, names[offset]))
    except BaseException:
        # Leave the fds as they were: the caller fails to start, nothing closes under it.
        for found in adopted:
            found.sock.detach()
        raise
    return adopted


def _adopt(fd: int, name: str) -> ListenSocket:
    what = f"socket activation: fd {fd}" + (f" ({name!r})" if name else "")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"{what} is not open: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{what} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if kind != socket.SOCK_STREAM:
            raise ValueError(
                f"{what} is a {_type_name(kind)} socket; HTTP needs a stream socket "
                "(ListenStream= in the .socket unit)"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(
                f"{what} is not a listening socket (the .socket unit must have Accept=no)"
            )
        if sock.family not in _FAMILIES:
            raise ValueError(f"{what} has address family {sock.family!r}; TCP or Unix only")
        sock.setblocking(False)
        os.set_inheritable(fd, False)
    except BaseException:
        sock.detach()
        raise
    return ListenSocket(fd=fd, name=name, family=sock.family, sock=sock)


def _number(text: str) -> int | None:
    """A non-negative decimal integer, or None (int() alone would take " 7", "-1" or "1_0")."""
    return int(text) if _DECIMAL.fullmatch(text) else None


def _type_name(kind: int) -> str:
    names: dict[int, str] = {socket.SOCK_DGRAM: "datagram", socket.SOCK_SEQPACKET: "seqpacket"}
    return names.get(kind, f"type {kind}")


def stop_timeout_s(env: Mapping[str, str] | None = None) -> float | None:
    """The unit's TimeoutStopSec= in seconds, as repeated in $FORWARDER_SYSTEMD_STOP_TIMEOUT_S.

    None when unset, "infinity" or 0 (systemd's "no timeout"), or not a number (logged).
    systemd sends SIGKILL when it runs out, so drain and save must end before it.
    """
    environ = os.environ if env is None else env
    text = environ.get(STOP_TIMEOUT_VAR, "").strip()
    if not text or text == "infinity":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        log.warning(
            "stop_timeout_ignored",
            variable=STOP_TIMEOUT_VAR,
            value=text,
            reason="not a number of seconds",
        )
        return None
    return seconds or None


def drain_timeout_s(configured_s: float, stop_timeout: float | None, *, reserve_s: float) -> float:
    """How long a stop may drain: ``shutdown.timeout_s``, cut to leave ``reserve_s`` for saving.

    ``stop_timeout`` is :func:`stop_timeout_s`; ``reserve_s`` covers what follows the drain
    (saving leftovers to the spool, closing listeners) before systemd's SIGKILL.
    """
    if stop_timeout is None:
        return configured_s
    return max(0.0, min(configured_s, stop_timeout - reserve_s))


def format_status(*, queued: int, in_delivery: int, delivered_per_min: float, spool: int) -> str:
    """The STATUS= line: "queue 12, in delivery 3, delivered 140/min, spool 0"."""
    return (
        f"queue {queued}, in delivery {in_delivery}, "
        f"delivered {round(delivered_per_min)}/min, spool {spool}"
    )


class PerMinute:
    """A counter's rate per minute over the last ``window_s``, from totals sampled now and then."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` is monotonic seconds (replaceable in tests)."""
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, total: int) -> float:
        """Record the counter's current total; returns the rate per minute over the window."""
        now = self._clock()
        if self._samples and total < self._samples[-1][1]:
            self._samples.clear()  # the counter went back (reset): start over
        self._samples.append((now, total))
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        since, before = self._samples[0]
        if now <= since:
            return 0.0
        return (total - before) * 60.0 / (now - since)
