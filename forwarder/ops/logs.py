"""Logs: structlog with key redaction, lines batched per loop turn, a level a reload can change.

JSON lines to stdout for journald (console output on a TTY); stdlib records (aiohttp's) pass
the same processors, so every line is redacted the same way. The numbers are in
`forwarder.ops.metrics`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from forwarder.ops.credentials import MIN_KEY_CHARS, secret_forms

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR
REDACTED = "[redacted]"


# What says which line this is: never redacted. `event` is our line's name (a constant of the
# code; a stdlib record's free-text message is scrubbed apart, `_scrub_message`); the ids and
# the event's name are what a reader looks a line up by. None of them can carry one of our
# secrets by our doing: ids we make are random UUIDs, account names are configured names or a
# digest of a client's key, and an app's own event_id, recipient_id and name are the app's data,
# sent to the remote and spooled as they are (a key an app writes there is one it chose to send).
PROTECTED_KEYS = frozenset(
    {"event", "event_id", "recipient_id", "name", "account", "level", "timestamp", "logger"}
)


def _forms(secrets: Iterable[str]) -> tuple[str, ...]:
    # Each key also as its Basic token and percent-encoded; longest first across keys too.
    # Text shorter than a key can be is never taken: "4" or "delivered" would mangle every line.
    forms = {
        form for secret in secrets if len(secret) >= MIN_KEY_CHARS for form in secret_forms(secret)
    }
    return tuple(sorted(forms, key=len, reverse=True))


class Redactor:
    """A structlog processor that replaces every known secret in a log line's keys and values.

    A secret is caught in each of its forms (`credentials.secret_forms`): as itself, as the
    base64 of a Basic header, and percent-encoded. Secrets shorter than
    `credentials.MIN_KEY_CHARS` are not taken (no key is that short: they are refused where
    keys come in), and the values of `PROTECTED_KEYS` are never touched, so redaction can
    never take a line's name or ids away.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = _forms(secrets)

    def scrub(self, value: object) -> object:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            # Keys too: a remote's answer can carry a secret as an object key.
            return {
                (self.scrub(k) if isinstance(k, str) else k): self.scrub(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if isinstance(value, BaseException):
            return self.scrub(repr(value))
        return value

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.secrets:
            for key, value in list(event_dict.items()):
                if key in PROTECTED_KEYS:
                    continue
                name = self.scrub(key)
                if isinstance(name, str) and name != key:  # a key is a field's name: rare
                    del event_dict[key]
                    event_dict[name] = self.scrub(value)
                else:
                    event_dict[key] = self.scrub(value)
        return event_dict


def _json_line(obj: Any, default: Any = None, **_kw: Any) -> str:
    """One log line as JSON: orjson on the hot path (one line per delivered event)."""
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # a lone surrogate, an int past 64 bits: the standard module copes
        return json.dumps(obj, default=default)


class _BatchedStream:
    """Log lines written during one turn of the event loop, passed on in one write.

    Every delivered event logs a line; a write and flush of its own (a system call each, on
    the event loop) cost more than the line's rendering. Lines gathered while the loop runs
    are written together at the end of that turn (`call_soon`), so a kill loses at most what
    one turn logged. With no running loop (the CLI, start-up, other threads) a line is
    written at once.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._parts: list[str] = []
        self._scheduled = False
        self._lock = threading.Lock()  # the spool thread may log while the loop flushes

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
            if self._scheduled:
                return len(text)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._scheduled = loop is not None
        if loop is None:
            self.flush_now()
        else:
            loop.call_soon(self.flush_now)
        return len(text)

    def flush(self) -> None:
        """Nothing to do now: a pending batch is written at the end of the loop's turn."""

    def flush_now(self) -> None:
        """Write what is gathered (also at exit, for a batch whose turn never came)."""
        with self._lock:
            parts, self._parts = self._parts, []
            self._scheduled = False
        if parts:
            # A closed or broken stdout must not take the daemon down; there is nowhere to say so.
            with contextlib.suppress(OSError, ValueError):
                self.out.write("".join(parts))
                self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()


_streams: list[_BatchedStream] = []


@atexit.register
def flush_logs() -> None:
    """Write every log line still gathered (the daemon calls it as it stops; atexit too)."""
    for stream in _streams:
        stream.flush_now()


class _Timestamp:
    """`timestamp` as structlog's `TimeStamper(fmt="iso", utc=True)` writes it, in a fifth of
    the time: the date and time of day are formatted once a second, not once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


_timestamp = _Timestamp()


class _LevelGate:
    """Drops lines below a level that a reload may change (cached loggers cannot be rebuilt)."""

    def __init__(self) -> None:
        self.levelno = logging.INFO

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if LEVELS.get(method, logging.ERROR) < self.levelno:
            raise structlog.DropEvent
        return event_dict


_gate = _LevelGate()
_redactor = Redactor()


def _scrub_message(
    logger: object, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A stdlib record's `event` is its message, free text (aiohttp's): scrubbed like a value."""
    if _redactor.secrets and "event" in event_dict:
        event_dict["event"] = _redactor.scrub(event_dict["event"])
    return event_dict


def set_log_level(level: str) -> None:
    """Change the level of every logger now (a config reload)."""
    levelno = LEVELS.get(level, logging.INFO)
    _gate.levelno = levelno
    logging.getLogger().setLevel(levelno)


def set_secrets(secrets: Iterable[str]) -> None:
    """Replace the values redacted from every log line (a reload may bring new keys)."""
    _redactor.secrets = _forms(secrets)


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """JSON lines to stdout for journald, or console output on a TTY; stdlib logs go the same way.

    Our own loggers write straight to the stream (no stdlib detour: that is the cheap path,
    structlog's performance guide); aiohttp's stdlib records are rendered by the same processors.
    """
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    flush_logs()  # what the previous configuration gathered goes out first
    batched = _BatchedStream(out)
    _streams[:] = [batched]
    set_secrets(secrets)
    redact = _redactor
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=out.isatty())
        # The traceback must pass the redactor too, so format it before redaction.
        tail: list[Any] = [redact, renderer]
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
        tail = [structlog.processors.format_exc_info, redact, renderer]
    shared: list[Any] = [
        _gate,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    levelno = LEVELS.get(level, logging.INFO)
    _gate.levelno = levelno
    structlog.configure(
        processors=[*shared, *tail],
        # Debug lines are filtered by the gate, not here, so a reload can turn them on.
        wrapper_class=structlog.make_filtering_bound_logger(min(levelno, logging.DEBUG)),
        logger_factory=structlog.WriteLoggerFactory(batched),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(batched)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _scrub_message,
                *tail,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levelno)
    # One line per request would drown the per-event outcome lines; errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
