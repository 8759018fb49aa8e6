"""Daemon configuration.

A TOML file (``/etc/forwarder/forwarder.toml`` by default) is read into frozen dataclasses, one per
section; ``FORWARDER_<SECTION>_<KEY>`` environment variables override single keys; the result is
checked strictly, and every error names the offending key or variable. The remote API key is not a
setting: `credentials.resolve_api_key` finds it in the environment, a file or a systemd credential.

Besides the ``[remote]`` section's own account (named ``default``), ``[accounts.NAME]`` tables
declare further accounts of the same API; `credentials.resolve_account_keys` finds their keys.

Each setting is declared once, as a ``setting(default, doc=..., lo=..., reload=..., secret=...)``
field of its section (forwarder/config/setting.py): its range check (`_validate`), whether a
reload applies it (`RESTART_ONLY`), `check-config`'s masking (`render_effective`), the shipped
config/forwarder.toml and the reference page's key table (forwarder/config/generate.py) all come
from that declaration. The declarations, with their documentation, are most of this module's length;
they are one piece with the loader and checks that read them (the package split moves the
schema, loading and rendering apart).
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import os
import re
import ssl
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

if typing.TYPE_CHECKING:
    from forwarder.ops.credentials import ApiKey

from forwarder.config.setting import Setting, bounds_error, setting, settings_of

__all__ = [
    "DEFAULT_ACCOUNT",
    "DEFAULT_CONFIG_PATH",
    "RESTART_ONLY",
    "AccountConfig",
    "Config",
    "ConfigError",
    "FleetConfig",
    "IntakeConfig",
    "LogConfig",
    "QueueConfig",
    "RemoteConfig",
    "RetryConfig",
    "ShutdownConfig",
    "StateConfig",
    "check_exposure",
    "is_loopback_host",
    "load_config",
    "render_effective",
    "resolve_group",
]

DEFAULT_CONFIG_PATH = Path("/etc/forwarder/forwarder.toml")

_FALLBACK_STATE_DIR = "/var/lib/forwarder"
_ENV_PREFIX = "FORWARDER_"
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_UNIX_SOCKET_PATH = 107
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")
_QUEUE_MODES = ("memory", "durable")

# The [remote] section's own account: events that name no account go here by default.
DEFAULT_ACCOUNT = "default"
# Same rule as events.ACCOUNT_RE (events name their account); kept here so config imports nothing.
_ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_CONCURRENCY = 1024
_MAX_RATE_LIMIT = 1_000_000
# A group commit holds its callers this long at most; past 100 ms it is latency, not grouping.
_MAX_GROUP_COMMIT_MS = 100.0
_MAX_HELD_EVENTS = 1_000_000


class ConfigError(Exception):
    """Invalid or unreadable configuration; the message names the key, variable or file."""


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    """``[intake]``: how local applications hand events to the daemon."""

    http_listen: str = setting(
        "127.0.0.1:8787",
        doc='TCP address for the local HTTP intake, "host:port"; IPv6 as "[::1]:8787"; "" '
        "disables TCP.",
        reload=False,
        bounds='`host:port` or `[v6]:port`, port 0..65535; `""` disables TCP; at least one of '
        "`http_listen` and `unix_socket` must be set; a host that is not loopback needs an intake "
        "token",
        ref="TCP address of the HTTP intake. Under socket activation the sockets systemd passes "
        "are used instead",
    )
    unix_socket: str = setting(
        "",
        doc='Path of a unix socket for the HTTP intake; "" disables it. At least one listener must '
        "be enabled.",
        reload=False,
        bounds=f'a path of at most {_MAX_UNIX_SOCKET_PATH} bytes, no NUL; `""` disables it',
        ref="Unix socket of the HTTP intake. A stale socket file nothing accepts on is replaced; "
        "a symlink, a non-socket or a live socket at the path is an error",
    )
    unix_socket_mode: int = setting(
        0o660,
        doc='Permissions of the unix socket, octal: write 0o660 or "0660" (a bare 660 would be '
        "decimal).",
        lo=0,
        hi=0o777,
        octal=True,
        reload=False,
        bounds='`0o000`..`0o777`; write `0o660` or `"0660"` (a bare `660` is decimal)',
        ref="file mode of the socket, set between `bind()` and `listen()`",
    )
    unix_socket_group: str = setting(
        "",
        doc='Group of the unix socket, a group name or a number (gid); "" keeps the daemon\'s own '
        "group.\nThe daemon's user must be root or a member of it. Mode and group are set before "
        "the socket\naccepts its first connection. (Under socket activation, forwarder.socket's "
        "SocketMode= and\nSocketGroup= apply instead.)",
        reload=False,
        bounds='a group name that exists, or a gid; `""` keeps the daemon\'s own group',
        ref="group of the socket; the daemon's user must be root or a member of it",
    )
    max_body_bytes: int = setting(
        1_048_576,
        doc="Largest accepted request body, bytes (default 1 MiB; at least 1024).",
        lo=1024,
        reload=False,
        ref="larger request bodies get 413 (with `Expect: 100-continue`, before the body is sent)",
    )
    max_batch: int = setting(
        1000,
        doc="Most events accepted in one request.",
        lo=1,
        ref="most events in one `POST /v1/events` request",
    )
    header_timeout_s: float = setting(
        10.0,
        doc="Slow and idle clients. A request's head (request line and headers) must arrive "
        "within\nheader_timeout_s: counted from the connection's opening for its first request, "
        "from the first\nbyte of each later one; else the connection is closed. Its body must "
        "arrive within\nbody_timeout_s of the head, else 408. A kept-alive connection idle for "
        "keepalive_timeout_s is\nclosed. An answer may wait on a full socket (a client that sends "
        "requests but does not read\nthe answers) for write_timeout_s, then the connection is "
        "closed. At most max_connections are\nopen at once (the Unix socket's included); past "
        "them 8 more may open for GET /healthz and\n/readyz only, and one more gets a 503 at once "
        "and is closed. Seconds (positive, finite); a\nreload applies them to new connections and "
        "requests.",
        unit="seconds",
        ref="a request's head (request line and headers) must arrive within this long of the "
        "connection's opening, or of the first byte of a later request on it; else the "
        "connection is closed without an answer",
    )
    body_timeout_s: float = setting(
        30.0,
        doc="",
        unit="seconds",
        ref="a request's body must arrive within this long of its head, else 408 `body_timeout` "
        "and the connection closes",
    )
    keepalive_timeout_s: float = setting(
        75.0,
        doc="",
        unit="seconds",
        ref="a kept-alive connection idle this long between requests is closed",
    )
    write_timeout_s: float = setting(
        10.0,
        doc="",
        unit="seconds",
        ref="an answer may wait this long on a full socket (a client that does not read its "
        "answers), then the connection is aborted",
    )
    max_connections: int = setting(
        512,
        doc="",
        lo=1,
        hi=1_000_000,
        ref="most open intake connections, TCP and Unix socket together; past it 8 more may ask "
        "`GET /healthz` and `/readyz` only, and any other gets 503 `too_many_connections` and is "
        "closed. At start the soft limit on open files is raised to this + 256 if the hard limit "
        "allows",
    )
    accept_client_keys: bool = setting(
        False,
        doc="On the drop-in endpoint, deliver under the API key the client sends by Basic auth\n"
        "(true), instead of the configured account's key (false).",
        ref="on the drop-in endpoint, deliver under the API key an app sends by Basic auth, as a "
        "client account of its own (see [Accounts and client keys](../how-to/accounts.md))",
    )
    # Read through credentials.resolve_intake_token, never directly.
    auth_token: str = setting(
        "",
        doc='A token apps must present on every request but GET /healthz, as "Authorization: '
        'Bearer TOKEN"\n(or "X-Forwarder-Token: TOKEN" when Authorization carries the app\'s own '
        "API key, see\naccept_client_keys); others get 401. Required when http_listen is not a "
        "loopback address\n(forwarder refuses to start otherwise, systemd's sockets included). "
        "Printable ASCII, no spaces,\nat least 16 characters (`openssl rand -hex 32`). Taken from "
        "the first of: auth_token (here or\nFORWARDER_INTAKE_AUTH_TOKEN), the file auth_token_file "
        "(an absolute path), the systemd credential\nintake_auth_token. Prefer the file (mode "
        "0600) to writing it here. A reload re-reads it.\nErrors about either never show its value "
        "(a token pasted into auth_token_file included).",
        secret="holds",
        bounds='printable ASCII without whitespace, at least 16 characters; `""`: none',
        ref="a token every request but `GET /healthz` must carry (`Authorization: Bearer …` or "
        "`X-Forwarder-Token`); required when a listener is not loopback. Prefer "
        "`auth_token_file` or `FORWARDER_INTAKE_AUTH_TOKEN` to writing it in the file",
    )
    auth_token_file: str = setting(
        "",
        doc="",
        secret="names",
        bounds="an absolute path",
        applied="reload (the file is re-read too)",
        ref="file holding the token, used when `auth_token` is empty; then the systemd "
        "credential `intake_auth_token`",
    )
    drop_in_answer: str = setting(
        "remote",
        doc='The drop-in endpoint\'s answer once the event is queued: "remote" answers as the '
        'remote does,\n200 {"success": true, "data": <forwarder\'s event number>}; "accepted" '
        'answers\n202 {"success": true, "data": {"id": "<event_id>", "status": "queued"}} '
        "(before 15.1).",
        choices=("remote", "accepted"),
        ref='the drop-in endpoint\'s answer: `"remote"` is the remote\'s own, `200 {"success": '
        'true, "data": <event number>}`; `"accepted"` is `202` with `data` = `{"id": event_id, '
        '"status": "queued"}` (see [the HTTP API](http-api.md#post-v1recipienteventscreate))',
    )

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` from ``http_listen``, IPv6 host without brackets; None if disabled."""
        if not self.http_listen:
            return None
        try:
            return _parse_listen(self.http_listen)
        except ValueError as exc:
            raise ConfigError(f"intake.http_listen: {exc}") from None


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """``[queue]``: where accepted events wait: memory only, or the spool on disk as well."""

    mode: str = setting(
        "memory",
        doc='"memory": accepted events wait in memory; a clean stop saves the rest to '
        'state.dir/spool.db,\nbut a kill -9, an OOM kill or a power cut loses them. "durable": '
        "every event is committed to\nstate.dir/spool.db (SQLite, WAL, fsynced; requests arriving "
        "together share one commit) before\nthe app gets its 202, and survives any crash.",
        choices=_QUEUE_MODES,
        # The storage backend is chosen when the spool is opened.
        reload=False,
        applied="restart ¹",
        ref='`"durable"`: every event is committed to `state.dir/spool.db` (fsynced) before '
        'intake answers; `"memory"`: events wait in memory and a clean stop saves the rest into '
        "the spool (see [Durability](../explanation/durability.md))",
    )
    max_events: int = setting(
        100_000,
        doc="Events held in memory (waiting plus in delivery). In memory mode the queue's "
        "capacity: past it\nintake answers 503. In durable mode the window over the spool: the "
        "rest waits on disk. Shared\nfairly between accounts: past half of it each other account "
        "keeps max_events / (2 * accounts)\nfor itself, and the durable window gives each account "
        "with events 1/N of it (max_bytes alike).",
        lo=1,
        ref="events in memory (waiting plus in delivery). Memory mode: past it intake answers 503 "
        "`queue_full`. Durable mode: the window over the spool; the rest waits on disk. Shared "
        "fairly between accounts",
    )
    max_bytes: int = setting(
        268_435_456,
        doc="Estimated bytes of the events in memory (waiting plus in delivery; default 256 MiB, "
        "at least\n1 MiB): each event counts what its text fields can take in memory (ASCII a "
        "byte a character;\nother text up to 8, as CPython holds it with its UTF-8 copy) plus "
        "1024 for Python's own objects.\nThe default fits the shipped unit's MemoryMax=512M with "
        "room for the save at a stop; raise it\nonly with MemoryMax (see "
        "docs/how-to/tuning.md).\nMemory mode: past it intake answers 503 queue_bytes_full (a "
        "request whose events alone exceed it\ngets 413). Durable mode: the window over the spool "
        "stops filling. A reload applies it.",
        lo=1_048_576,
        default_doc="`268435456` (256 MiB)",
        ref="estimated bytes of the events in memory, the second bound beside `max_events` (see "
        "[the memory bound](../explanation/durability.md)); past it 503 `queue_bytes_full`, and a "
        "request whose events alone exceed it gets 413 `too_large`; in durable mode it bounds "
        "the window. Lowering it drops nothing",
    )
    max_disk_bytes: int = setting(
        1_073_741_824,
        doc="Durable mode: most event data in the spool, as bytes of the stored (encoded) events "
        "(1 Gi);\npast it intake answers 503.",
        lo=1_048_576,
        # The spool's disk bound is set when it is opened.
        reload=False,
        applied="restart ¹",
        default_doc="`1073741824` (1 GiB)",
        ref="durable mode: most event data in the spool, as bytes of the stored (encoded) "
        "events; past it 503 `spool_full`",
    )
    group_commit_ms: float = setting(
        8.0,
        doc="Durable mode: the longest a group commit waits for more requests while they keep "
        "arriving\n(0-100 ms; it is cut at once when they stop). Longer: fewer fsyncs under load, "
        "more latency.",
        lo=0,
        # Past 100 ms it is latency, not grouping.
        hi=_MAX_GROUP_COMMIT_MS,
        unit="milliseconds",
        ref="durable mode: the longest a group commit waits for more requests while they keep "
        "arriving (cut at once when they stop); longer means fewer fsyncs under load and more "
        "latency per request",
    )
    held_max_events: int = setting(
        1000,
        doc="Events of an account without a delivery lane (removed from the config, or a client "
        "key not\npresented again since a restart) are held apart, not counted in max_events: at "
        "most this many\n(1-1000000) in memory. Memory mode dead-letters the oldest past it; "
        "durable mode leaves the rest\nin the spool until there is room. A reload applies it.",
        lo=1,
        hi=_MAX_HELD_EVENTS,
        ref="events of accounts without a lane (removed from the config, or a client key not "
        "presented since a restart) held apart from `max_events`; memory mode dead-letters the "
        "oldest past it (`held_without_account`), durable mode leaves the rest in the spool",
    )
    held_max_age_s: float = setting(
        86_400.0,
        doc="The longest an event is held, in seconds since it was accepted (default a day); "
        "then it is\ndead-lettered with the reason held_without_account. Its account coming back "
        "ends the hold.",
        unit="seconds",
        ref="a held event is dead-lettered (`held_without_account`) once this long after it was "
        "accepted; its account coming back first ends the hold",
    )


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """``[remote]``: the direct-mail API the events are delivered to."""

    base_url: str = setting(
        "https://api-eu1.stannp.com/v1",
        doc="Base URL of the direct-mail API. Must be https:// (plain http:// only to a loopback "
        "host).",
        bounds="an absolute `https://` URL without user, query or fragment; `http://` only to a "
        "loopback host (the mock)",
        ref="the remote of the `default` account (US/Canada: `https://api-us1.stannp.com/v1`); a "
        "change is used from the next attempt on",
    )
    api_key_file: str = setting(
        "",
        doc='Absolute path of the file holding the API key; "" means not used (see the key '
        "sources at\nthe top). A value that is not an absolute path is refused, without being "
        "shown.",
        secret="names",
        bounds="an absolute path",
        applied="reload (the file is re-read too)",
        ref="file holding the `default` account's API key (after `FORWARDER_API_KEY`, before the "
        "credential `api_key`; see below)",
    )
    rate_limit_per_minute: int = setting(
        300,
        doc="The account's request quota, requests per minute (1..1000000).",
        lo=1,
        hi=_MAX_RATE_LIMIT,
        ref="the account's quota, the rate limiter's starting point; the remote's "
        "`X-RateLimit-*` headers then correct it. `[accounts.NAME]` tables inherit it",
    )
    concurrency: int = setting(
        0,
        doc="Requests in flight to the API at once: 0 adapts it between min_concurrency and\n"
        "max_concurrency (raised while it pays in throughput, halved on errors); 1..1024 fixes "
        "it.",
        lo=0,
        hi=_MAX_CONCURRENCY,
        ref="requests in flight per account: `0` adapts between `min_concurrency` and "
        "`max_concurrency` (see [Flow control](../explanation/flow-control.md)); `N` fixes it",
    )
    min_concurrency: int = setting(
        1,
        doc="Bounds for adaptive concurrency: 1 <= min_concurrency <= max_concurrency <= 1024.",
        lo=1,
        hi=_MAX_CONCURRENCY,
        bounds=f"1..{_MAX_CONCURRENCY}, at most `max_concurrency`",
        ref="lower bound of adaptive concurrency",
    )
    max_concurrency: int = setting(
        64,
        doc="",
        lo=1,
        hi=_MAX_CONCURRENCY,
        ref="upper bound of adaptive concurrency",
    )
    per_recipient_order: bool = setting(
        True,
        doc="Deliver the events of one account and recipient_id in the order they were accepted.",
        ref="deliver the events of one account and `recipient_id` in the order they were "
        "accepted; `false`: plain FIFO per account",
    )
    breaker_failures: int = setting(
        5,
        doc="Consecutive transient failures that open the circuit breaker (1..10000).",
        lo=1,
        hi=10_000,
        ref="consecutive transient failures (timeouts, dropped connections, 5xx; not 429) that "
        "open an account's circuit breaker",
    )
    breaker_probe_initial_s: float = setting(
        1.0,
        doc="While the breaker is open, probe the API after this long, seconds; the interval "
        "grows\nup to breaker_probe_max_s while probes fail.",
        unit="seconds",
        bounds="seconds, at most `breaker_probe_max_s`",
        ref="while the breaker is open, one probe after this long, doubling while probes fail…",
    )
    breaker_probe_max_s: float = setting(60.0, doc="", unit="seconds", ref="…up to this")
    default_account: str = setting(
        DEFAULT_ACCOUNT,
        doc='Account for events that name none: "default" (this section\'s) or the NAME of an '
        "[accounts.NAME].",
        bounds='`"default"` or the NAME of an `[accounts.NAME]` table',
        ref='the account events go to when they name none (`"default"` is the `[remote]` '
        "section's own); when it names another, the `[remote]` key is optional",
    )
    timeout_s: float = setting(
        30.0,
        doc="Total time allowed for one request, seconds.",
        unit="seconds",
        reload=False,
        ref="total time for one request to the remote",
    )
    connect_timeout_s: float = setting(
        5.0,
        doc="Time allowed to establish the connection, seconds.",
        unit="seconds",
        reload=False,
        ref="time to connect to the remote",
    )
    auth_retry_s: float = setting(
        60.0,
        doc="After the API rejects the key, wait this long before trying again, seconds.",
        unit="seconds",
        ref="after a 401/403, delivery pauses and one event probes the key this often",
    )
    ca_bundle: str = setting(
        "",
        doc="A PEM file of CA certificates to verify the API's TLS certificate with, instead of "
        "the\nsystem's trust store (e.g. behind a TLS-inspecting proxy); \"\" uses the system's. "
        "Certificates\nand host names are always verified: there is no switch to turn that off. "
        "Needs a restart.",
        reload=False,
        bounds='a readable PEM file holding at least one CA certificate; `""`: the system\'s '
        "trust store",
        ref="CA certificates to verify the remote with, instead of the system's. Certificates "
        "and host names are always verified",
    )


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``[retry]``: exponential backoff for failed deliveries."""

    initial_backoff_s: float = setting(
        0.5,
        doc="First delay before retrying a failed delivery, seconds; doubles up to max_backoff_s.",
        unit="seconds",
        bounds="seconds, at most `max_backoff_s`",
        ref="first wait before a retry (exponential backoff with full jitter)",
    )
    max_backoff_s: float = setting(
        60.0,
        doc="Longest delay between retries, seconds.",
        unit="seconds",
        ref="longest wait between retries",
    )
    max_elapsed_s: float = setting(
        3600.0,
        doc="Give up on an event after retrying for this long, seconds (default 1 hour).",
        unit="seconds",
        ref="give up (dead-letter, reason `gave_up`) when the next attempt would start later "
        "than this after the first",
    )


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where durable state lives.

    The dataclass default is the fixed fallback; :func:`load_config` uses systemd's
    ``STATE_DIRECTORY`` instead when the key is not set anywhere.
    """

    dir: str = setting(
        _FALLBACK_STATE_DIR,
        doc="Directory for durable state. If this key is absent, systemd's $STATE_DIRECTORY\n"
        "(StateDirectory=) is used, else /var/lib/forwarder. It must be ours and not writable\n"
        "by group or others (0700 is made if it is missing); one daemon at a time uses it.",
        reload=False,
        default_doc=f'`$STATE_DIRECTORY` or `"{_FALLBACK_STATE_DIR}"`',
        bounds="not empty; a directory owned by the daemon's user and not writable by group or "
        "others (made 0700 if missing)",
        ref="the spool (`spool.db`: events, dead letters, outcomes), the lock, the PID file and "
        "the event-number file. When the key is set nowhere, systemd's `$STATE_DIRECTORY` (its "
        "first entry) is used, else `/var/lib/forwarder`. One daemon per directory",
    )
    outcome_retention_s: float = setting(
        86_400.0,
        doc="How long GET /v1/events/{id} remembers what became of an event (delivered, "
        "dead-lettered):\n86400 s is the remote's idempotency window. Memory holds at most "
        "outcome_max_count of them\n(the oldest go first); durable mode also keeps them in the "
        "spool for the whole period.",
        unit="seconds",
        ref="how long `GET /v1/events/{id}` remembers what became of an event (the remote's "
        "idempotency window)",
    )
    outcome_max_count: int = setting(
        20_000,
        doc="",
        lo=0,
        hi=100_000_000,
        ref="outcomes held in memory at most, about 0.4 kB each (the oldest are forgotten first; "
        "`0`: none); durable mode also keeps them in the spool for the whole retention",
    )

    @property
    def path(self) -> Path:
        """The state directory as a path."""
        return Path(self.dir)


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """``[shutdown]``: graceful shutdown."""

    timeout_s: float = setting(
        20.0,
        doc="On shutdown, time allowed to finish in-flight work before stopping, seconds.",
        unit="seconds",
        ref="how long a stop keeps delivering before saving the rest into the spool (under "
        "systemd it also ends 5 s before `FORWARDER_SYSTEMD_STOP_TIMEOUT_S`; see "
        "[Shutdown](../explanation/shutdown.md))",
    )


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: logging level and output format."""

    level: str = setting(
        "info",
        doc="Least severe level logged: debug, info, warning or error.",
        choices=_LOG_LEVELS,
        fold_case=True,
        ref="least severe level logged",
    )
    format: str = setting(
        "auto",
        doc='Log output: "json", "console", or "auto" (chosen by where the output goes).',
        choices=_LOG_FORMATS,
        fold_case=True,
        reload=False,
        ref="`json`: one JSON object per line; `console`: coloured lines; `auto`: console on a "
        "TTY, JSON otherwise",
    )


# Redis URL schemes redis-py connects with: plain, TLS, a Unix socket.
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_MEMBER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """``[fleet]``: many hosts sharing one account's rate budget (and queue) through Redis."""

    redis_url: str = setting(
        "",
        doc='Redis 7 shared by the fleet: "redis://host:6379/0", "rediss://host:6380/0" (TLS) or\n'
        '"unix:///run/redis/redis.sock". "" (the default): no fleet, every budget is this '
        "host's own.\nNo password in the URL: it comes from redis_password_file or the systemd "
        "credential\nredis_password, so it never reaches a log.",
        secret="names",
        reload=False,
        example="rediss://redis.internal:6380/0",
        bounds='a `redis://`, `rediss://` or `unix://` URL without a password; `""`: off',
        ref="the Redis server the fleet shares ; set, the "
        "accounts' rate budgets are shared by every host that names the same server and prefix",
    )
    redis_password_file: str = setting(
        "",
        doc="File holding the Redis password (then the systemd credential redis_password).",
        secret="names",
        reload=False,
        bounds="an absolute path",
        ref="file holding the Redis password (`AUTH`); without it the systemd credential "
        "`redis_password` is used when present, else no password",
    )
    member: str = setting(
        "",
        doc='This host\'s name in the fleet; "" means the host name. Unique per host, stable '
        "across restarts.",
        reload=False,
        default_doc="the host name",
        bounds="letters, digits, `_`, `.` and `-`, 1 to 64, starting with a letter or digit",
        ref="this host's member name: its heartbeat, its consumer name and its leases. Stable "
        "across restarts, unique in the fleet",
    )
    partitions: int = setting(
        16,
        doc='queue.mode "fleet": partitions of each account\'s stream (a recipient always '
        "maps to the same one).\nThe same on every host; changing it needs the fleet stopped "
        "and drained.",
        lo=1,
        hi=1024,
        reload=False,
        ref="partitions of each account's shared stream; a recipient's events stay in one, so "
        "their order holds. The same on every host",
    )
    claim_idle_s: float = setting(
        60.0,
        reload=False,
        doc="A dead member's unacknowledged events are taken over after this long (longer than "
        "a request's\nremote.timeout_s).",
        unit="seconds",
        ref="how long an event handed to a member may stay unacknowledged before another member "
        "claims it; must exceed `remote.timeout_s`",
    )
    lease_s: float = setting(
        10.0,
        reload=False,
        doc="A partition's lease: renewed every lease_s / 3; a host that cannot renew stops "
        "delivering\nfrom it before the lease ends.",
        unit="seconds",
        ref="how long a host owns a partition without renewing it; a stopped or cut-off host's "
        "partitions move to the others after this",
    )
    key_prefix: str = setting(
        "forwarder",
        doc="The prefix of every Redis key (two fleets on one server need two prefixes).",
        reload=False,
        bounds="letters, digits, `_`, `.`, `:` and `-`, 1 to 64",
        ref="the start of every key forwarder writes; an account's keys are "
        "`{PREFIX:ACCOUNT}:…`, one hash slot per account",
    )

    @property
    def enabled(self) -> bool:
        """Whether this host is part of a fleet (a Redis server is named)."""
        return bool(self.redis_url)


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """``[accounts.NAME]``: a further account of the remote API, with its own key and quota.

    After :func:`load_config`, ``base_url`` and ``rate_limit_per_minute`` hold the effective
    values: those of ``[remote]`` unless the table sets its own. The key comes from the variable
    named by ``api_key_env``, else ``api_key_file``, else the systemd credential ``api_key.NAME``.
    """

    name: str
    base_url: str = setting(
        "",
        doc="Base URL of this account's API; default: remote.base_url.",
        example="https://api-us1.stannp.com/v1",
        default_doc="`remote.base_url`",
        bounds="as `remote.base_url`",
        ref="the account's remote",
    )
    api_key_file: str = setting(
        "",
        doc="File holding this account's API key.",
        secret="names",
        example="/etc/forwarder/us.key",
        bounds="an absolute path",
        applied="reload (the file is re-read too)",
        ref="file holding the account's key",
    )
    api_key_env: str = setting(
        "",
        doc="Name of an environment variable holding this account's API key.",
        secret="names",
        example="FORWARDER_US_KEY",
        bounds="an environment variable's name (letters, digits and `_`, not starting with a "
        "digit)",
        ref="variable holding the account's key",
    )
    rate_limit_per_minute: int = setting(
        0,
        doc="This account's request quota per minute; default: remote.rate_limit_per_minute.",
        lo=1,
        hi=_MAX_RATE_LIMIT,
        example=600,
        default_doc="`remote.rate_limit_per_minute`",
        ref="the account's quota per minute",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole daemon configuration; ``Config()`` is the built-in defaults."""

    intake: IntakeConfig = field(default_factory=IntakeConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    state: StateConfig = field(default_factory=StateConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    # [accounts.NAME] tables by name; the [remote] account ("default") is not in here.
    accounts: dict[str, AccountConfig] = field(default_factory=dict)

    def account_names(self) -> tuple[str, ...]:
        """Every account: ``"default"`` (the ``[remote]`` section's) first, then the rest sorted."""
        return (DEFAULT_ACCOUNT, *sorted(self.accounts))

    def account(self, name: str) -> AccountConfig:
        """The account called ``name``; ``"default"`` is described from ``[remote]``.

        For the default account ``api_key_env`` is ``FORWARDER_API_KEY``, the first source its
        key is looked for in (its systemd credential is ``api_key``). Raises KeyError if unknown.
        """
        if name == DEFAULT_ACCOUNT:
            return AccountConfig(
                name=DEFAULT_ACCOUNT,
                base_url=self.remote.base_url,
                api_key_file=self.remote.api_key_file,
                api_key_env="FORWARDER_API_KEY",
                rate_limit_per_minute=self.remote.rate_limit_per_minute,
            )
        return self.accounts[name]


# --- schema -------------------------------------------------------------------------------------

_Kind = Literal["str", "int", "float", "mode", "bool"]

_SECTIONS: dict[str, type[Any]] = {
    "intake": IntakeConfig,
    "queue": QueueConfig,
    "remote": RemoteConfig,
    "retry": RetryConfig,
    "state": StateConfig,
    "shutdown": ShutdownConfig,
    "log": LogConfig,
    "fleet": FleetConfig,
}

_EXPECTED: dict[_Kind, str] = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "mode": 'an octal mode (0o660 or "0660")',
    "bool": "a boolean (true or false)",
}


def _field_kinds(cls: type[Any]) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    by_type: dict[object, _Kind] = {str: "str", int: "int", float: "float", bool: "bool"}
    # Octal file modes are ints but also accept strings of octal digits ("0660").
    return {
        f.name: "mode" if meta.octal else by_type[hints[f.name]] for f, meta in settings_of(cls)
    }


_FIELD_KINDS: dict[str, dict[str, _Kind]] = {
    name: _field_kinds(cls) for name, cls in _SECTIONS.items()
}
# The keys of an [accounts.NAME] table (`name` is the table's name, not a setting).
_ACCOUNT_KINDS: dict[str, _Kind] = _field_kinds(AccountConfig)
# Every setting's declaration by `section.key` (and an account table's by key).
SETTINGS: dict[str, Setting] = {
    f"{name}.{f.name}": meta for name, cls in _SECTIONS.items() for f, meta in settings_of(cls)
}
_ACCOUNT_SETTINGS: dict[str, Setting] = {f.name: meta for f, meta in settings_of(AccountConfig)}
# Settings a reload cannot change in a running process: they need a restart.
RESTART_ONLY: tuple[str, ...] = tuple(key for key, meta in SETTINGS.items() if not meta.reload)


# --- value conversion ---------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OCTAL_RE = re.compile(r"(?:0[oO])?([0-7]+)")
_ENV_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_ENV_BOOLS |= {"false": False, "0": False, "no": False, "off": False}


# Settings that hold a secret, or name where one is and so may hold one pasted by mistake (a
# token in auth_token_file, a key in api_key_env): no error about them ever shows their value,
# whatever the mistake (a wrong type, a relative path, an unreadable file). See `_secret_key`.
_SECRET_ACCOUNT_KEYS = frozenset(key for key, meta in _ACCOUNT_SETTINGS.items() if meta.secret)
# A value this short is no secret worth hiding, and scrubbing it would garble the message.
_MIN_SCRUBBED_CHARS = 6
NOT_SHOWN = "<not shown>"


def _secret_key(key: str) -> bool:
    """Whether ``section.key`` (or ``accounts.NAME.key``) holds or names a secret."""
    if key.startswith("accounts."):
        return key.rpartition(".")[2] in _SECRET_ACCOUNT_KEYS
    meta = SETTINGS.get(key)
    return meta is not None and meta.secret != ""


def _short(value: str, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _describe(value: object, secret: bool = False) -> str:
    if secret:
        # The type only: an unquoted `auth_token = 4815...` must not come back in the error.
        kind = _describe(value).split(" (", 1)[0]
        return f"{kind} (the value is not shown: this setting holds or names a secret)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # TOML dates and times


def _parse_octal(text: str) -> int | None:
    match = _OCTAL_RE.fullmatch(text)
    return int(match.group(1), 8) if match else None


def _from_toml(kind: _Kind, value: object, key: str) -> object:
    # bool is a subclass of int; a TOML `true` is never a number here.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "str" and isinstance(value, str):
        return value
    if kind in ("int", "mode") and is_int:
        return value
    if kind == "float" and (is_int or isinstance(value, float)):
        return float(typing.cast(float, value))
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "mode" and isinstance(value, str):
        mode = _parse_octal(value)
        if mode is not None:
            return mode
    raise ConfigError(
        f"{key}: expected {_EXPECTED[kind]}, got {_describe(value, _secret_key(key))}"
    )


def _from_env(kind: _Kind, text: str, var: str, secret: bool = False) -> object:
    if kind == "str":
        return text
    if secret:
        raise ConfigError(f"{var}: expected {_EXPECTED[kind]} (the value is not shown)")
    stripped = text.strip()
    if kind == "int" and _INT_RE.fullmatch(stripped):
        return int(stripped)
    if kind == "float" and _FLOAT_RE.fullmatch(stripped):
        return float(stripped)
    if kind == "mode":
        mode = _parse_octal(stripped)
        if mode is not None:
            return mode
    if kind == "bool":
        flag = _ENV_BOOLS.get(stripped.lower())
        if flag is not None:
            return flag
        raise ConfigError(
            f"{var}: expected a boolean (true/false, 1/0, yes/no or on/off), got {_short(text)}"
        )
    raise ConfigError(f"{var}: expected {_EXPECTED[kind]}, got {_short(text)}")


def _suggest(name: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix}{matches[0]}?)" if matches else ""


# --- loading ------------------------------------------------------------------------------------


def _read_toml(path: Path, *, missing_ok: bool) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"config file {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        # utf-8-sig: tolerate a BOM left by Windows editors.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (at byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _file_values(document: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    values: dict[str, dict[str, object]] = {}
    for name, body in document.items():
        if name == "accounts":
            continue  # see _account_values
        if name not in _SECTIONS:
            if isinstance(body, dict):
                hint = _suggest(name, [*_SECTIONS, "accounts"])
                raise ConfigError(f"unknown section [{name}]{hint}")
            raise ConfigError(f"unknown key {name} (settings belong in a [section])")
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a table [{name}], got {_describe(body)}")
        kinds = _FIELD_KINDS[name]
        section = values.setdefault(name, {})
        for key, raw in body.items():
            if key not in kinds:
                hint = _suggest(key, kinds, f"{name}.")
                raise ConfigError(f"unknown key {name}.{key}{hint}")
            section[key] = _from_toml(kinds[key], raw, f"{name}.{key}")
    return values


def _account_values(document: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    """The keys each ``[accounts.NAME]`` table sets, by account name."""
    tables = document.get("accounts", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"accounts: expected tables [accounts.NAME], got {_describe(tables)}")
    values: dict[str, dict[str, object]] = {}
    for name, body in tables.items():
        if name == DEFAULT_ACCOUNT:
            raise ConfigError(
                f'accounts.{DEFAULT_ACCOUNT}: the name "{DEFAULT_ACCOUNT}" is reserved for the '
                "[remote] account; choose another name"
            )
        if not _ACCOUNT_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"accounts: invalid account name {_short(name)}: "
                "use 1-64 characters of letters, digits, - and _"
            )
        where = f"accounts.{name}"
        if not isinstance(body, dict):
            raise ConfigError(
                f"{where}: expected a table [{where}] (each account is a table of its own), "
                f"got {_describe(body)}"
            )
        account = values[name] = {}
        for key, raw in body.items():
            if key not in _ACCOUNT_KINDS:
                raise ConfigError(
                    f"unknown key {where}.{key}{_suggest(key, _ACCOUNT_KINDS, f'{where}.')}"
                )
            account[key] = _from_toml(_ACCOUNT_KINDS[key], raw, f"{where}.{key}")
    return values


def _env_section(rest: str) -> str | None:
    for name in _SECTIONS:
        if rest.startswith(name.upper() + "_"):
            return name
    return None


def _env_values(
    env: Mapping[str, str], key_vars: typing.Collection[str] = ()
) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Overrides from ``FORWARDER_<SECTION>_<KEY>``, and which variable set each ``section.key``.

    ``key_vars`` are the variables named by ``accounts.*.api_key_env``: they hold keys, not
    settings, whatever their names look like.
    """
    values: dict[str, dict[str, object]] = {}
    origins: dict[str, str] = {}
    for var in sorted(env):  # sorted: the same error first on every run
        # FORWARDER_API_KEY is not a setting (see credentials.py).
        if not var.startswith(_ENV_PREFIX) or var == "FORWARDER_API_KEY" or var in key_vars:
            continue
        rest = var[len(_ENV_PREFIX) :]
        # Account tables have no overrides: names may contain "_", so FORWARDER_ACCOUNTS_A_B_C
        # could not say which part is the account and which the key.
        if rest.startswith("ACCOUNTS_"):
            raise ConfigError(
                f"{var}: [accounts.NAME] tables cannot be set from the environment; "
                "set them in the config file"
            )
        section = _env_section(rest)
        if section is None:
            continue  # not a setting; other FORWARDER_* variables may belong to other components
        key = rest[len(section) + 1 :].lower()
        kinds = _FIELD_KINDS[section]
        if key not in kinds:
            hint = _suggest(key, kinds, f"{section}.")
            raise ConfigError(f"{var}: no such setting {section}.{key}{hint}")
        values.setdefault(section, {})[key] = _from_env(
            kinds[key], env[var], var, _secret_key(f"{section}.{key}")
        )
        origins[f"{section}.{key}"] = var
    return values, origins


def _default_state_dir(env: Mapping[str, str]) -> str:
    # systemd's StateDirectory= may list several directories, colon-separated; the first is ours.
    first = env.get("STATE_DIRECTORY", "").split(":", 1)[0]
    return first or _FALLBACK_STATE_DIR


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load, override and validate the configuration.

    ``path`` None means :data:`DEFAULT_CONFIG_PATH` if it exists, else the built-in defaults; a
    given path must exist. ``env`` (default ``os.environ``) supplies ``FORWARDER_<SECTION>_<KEY>``
    overrides and ``STATE_DIRECTORY``. Raises :class:`ConfigError` naming the key at fault.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    if path is None:
        document = _read_toml(DEFAULT_CONFIG_PATH, missing_ok=True) or {}
    else:
        document = _read_toml(path, missing_ok=False) or {}
    try:
        return _load(document, environ)
    except ConfigError as exc:
        # Every error path already leaves secret settings' values out; this is the second line
        # of defence, so that a message added later cannot echo one either.
        message = str(exc)
        for secret in _secret_values(document, environ):
            message = message.replace(secret, NOT_SHOWN)
        if message == str(exc):
            raise
        raise ConfigError(message) from None


def _secret_values(document: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """The values given to secret settings (`_secret_key`), longest first, as text."""
    found: list[object] = []
    for name, body in document.items():
        if isinstance(body, dict) and name != "accounts":
            found += [v for k, v in body.items() if _secret_key(f"{name}.{k}")]
    tables = document.get("accounts")
    if isinstance(tables, dict):
        for body in tables.values():
            if isinstance(body, dict):
                found += [v for k, v in body.items() if k in _SECRET_ACCOUNT_KEYS]
    for var, text in env.items():
        section = _env_section(var[len(_ENV_PREFIX) :]) if var.startswith(_ENV_PREFIX) else None
        key = var[len(_ENV_PREFIX) + len(section or "") + 1 :].lower()
        if section is not None and _secret_key(f"{section}.{key}"):
            found.append(text)
    texts = {str(v) for v in found if isinstance(v, str | int | float)}
    texts |= {text.strip() for text in texts}
    return sorted((t for t in texts if len(t) >= _MIN_SCRUBBED_CHARS), key=len, reverse=True)


def _load(document: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    values = _file_values(document)
    account_values = _account_values(document)
    key_vars = {str(a["api_key_env"]) for a in account_values.values() if "api_key_env" in a}
    overrides, origins = _env_values(environ, key_vars)
    for name, section in overrides.items():
        values.setdefault(name, {}).update(section)
    state = values.setdefault("state", {})
    if "dir" not in state:
        state["dir"] = _default_state_dir(environ)

    sections: dict[str, Any] = {
        name: dataclasses.replace(cls(), **values.get(name, {})) for name, cls in _SECTIONS.items()
    }
    remote: RemoteConfig = sections["remote"]
    # Filled in here, not from a sentinel later: an explicit `rate_limit_per_minute = 0` or
    # `base_url = ""` is then an error rather than silently inherited.
    inherited = AccountConfig(
        name="", base_url=remote.base_url, rate_limit_per_minute=remote.rate_limit_per_minute
    )
    sections["accounts"] = {
        name: dataclasses.replace(inherited, name=name, **typing.cast(dict[str, Any], keys))
        for name, keys in sorted(account_values.items())
    }
    return _validate(dataclasses.replace(Config(), **sections), origins)


# --- validation ---------------------------------------------------------------------------------

_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _parse_listen(value: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port``; ValueError with the reason otherwise."""
    example = "expected host:port such as 127.0.0.1:8787 or [::1]:8787"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"{example}, got {_short(value)} (missing ']')")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_short(host)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{example}, got {_short(value)}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"{example}, got {_short(value)}")
        if not host:
            raise ValueError(
                f"missing host in {_short(value)} "
                "(use 0.0.0.0:PORT or [::]:PORT for all interfaces)"
            )
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, e.g. [::1]:8787, got {_short(value)}")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"invalid host {_short(host)}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"port must be a number 0..65535, got {_short(port_text)}")
    return host, int(port_text)


_MAX_GID = 2**32 - 2  # (gid_t)-1 means "unchanged" to chown


def resolve_group(value: str) -> int:
    """The gid that ``intake.unix_socket_group`` names: a number as given, else a group name.

    Looking a name up may block (NSS), so call it off the event loop. ValueError says why not.
    """
    text = value.strip()
    if text.isdigit() and text.isascii():
        gid = int(text)
        if gid > _MAX_GID:
            raise ValueError(f"gid {gid} is out of range (0..{_MAX_GID})")
        return gid
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no such group {_short(value)} (give a group name or a gid)") from None


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an address) is loopback: localhost, 127.0.0.0/8, ::1.

    Any other name counts as not loopback: it may resolve anywhere. ``0.0.0.0`` and ``::`` (every
    interface) are not loopback.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone is no part of it
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback


_TOKEN_SOURCES = (
    "intake.auth_token_file (or intake.auth_token, FORWARDER_INTAKE_AUTH_TOKEN, or the systemd "
    "credential intake_auth_token)"
)


def check_exposure(listeners: typing.Sequence[tuple[str, str]], has_token: bool) -> None:
    """Refuse listeners other machines can reach unless intake requires a token.

    ``listeners`` are ``(where, host)`` pairs, e.g. ``("intake.http_listen", "0.0.0.0")``;
    raises :class:`ConfigError` naming the first whose host is not loopback.
    """
    if has_token:
        return
    for where, host in listeners:
        if not is_loopback_host(host):
            raise ConfigError(
                f"{where}: {host} is not a loopback address, so anyone who can reach it could "
                f"send events: set {_TOKEN_SOURCES} to require a token, or listen on 127.0.0.1"
            )


def _normalise_base_url(url: str) -> str:
    """The base URL without trailing slashes; ValueError with the reason if unacceptable.

    The URL itself is not echoed in errors: it could carry credentials.
    """
    usage = "must be an absolute https:// URL such as https://api-eu1.stannp.com/v1"
    if not url:
        raise ValueError(f"{usage}, got an empty string")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must not contain whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not url.lower().startswith(parts.scheme + "://"):
        raise ValueError(usage)
    try:
        host = parts.hostname
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"{usage} ({exc})") from None
    if not host:
        raise ValueError(f"{usage} (no host)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not contain user:password@; the API key is configured separately")
    if "?" in url or "#" in url:
        raise ValueError("must not contain a query string or fragment")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"plain http:// is only allowed for loopback hosts (localhost, 127.0.0.0/8, ::1): "
            f"the API key would travel in clear text to {host}; use https://"
        )
    return url.rstrip("/")


def _check_ca_bundle(path: str) -> None:
    """ValueError unless `path` is a readable file with at least one PEM CA certificate."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        detail = exc.reason or str(exc)
        raise ValueError(f"{path} holds no usable PEM CA certificate ({detail})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def _validate(config: Config, origins: Mapping[str, str]) -> Config:
    """Check every key; return the config with normalised values (URL, lower-case log names)."""

    def fail(key: str, detail: str) -> ConfigError:
        where = f"{key} (from {origins[key]})" if key in origins else key
        return ConfigError(f"{where}: {detail}")

    # The per-field bounds and choices, from each setting's declaration; the checks after it
    # are the rules a per-field bound cannot say (other settings, the file system, syntax).
    folded: dict[str, dict[str, str]] = {}
    for key, meta in SETTINGS.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if meta.fold_case and isinstance(value, str):
            value = folded.setdefault(section, {})[name] = value.lower()
        error = bounds_error(meta, value)
        if error is not None:
            raise fail(key, error)
    for name, account in sorted(config.accounts.items()):
        for key, meta in _ACCOUNT_SETTINGS.items():
            error = bounds_error(meta, getattr(account, key))
            if error is not None:
                raise fail(f"accounts.{name}.{key}", error)

    intake = config.intake
    if intake.http_listen:
        try:
            _parse_listen(intake.http_listen)
        except ValueError as exc:
            raise fail("intake.http_listen", str(exc)) from None
    if intake.unix_socket:
        size = len(os.fsencode(intake.unix_socket))
        if "\0" in intake.unix_socket:
            raise fail("intake.unix_socket", "must not contain a NUL character")
        if size > _MAX_UNIX_SOCKET_PATH:
            raise fail(
                "intake.unix_socket",
                f"path too long for a unix socket ({size} bytes, at most {_MAX_UNIX_SOCKET_PATH})",
            )
    if not intake.http_listen and not intake.unix_socket:
        raise ConfigError(
            "intake.http_listen and intake.unix_socket are both empty: enable at least one listener"
        )
    if intake.unix_socket_group:
        try:
            resolve_group(intake.unix_socket_group)
        except ValueError as exc:
            raise fail("intake.unix_socket_group", str(exc)) from None

    remote = config.remote
    try:
        base_url = _normalise_base_url(remote.base_url)
    except ValueError as exc:
        raise fail("remote.base_url", str(exc)) from None
    if remote.min_concurrency > remote.max_concurrency:
        raise fail(
            "remote.min_concurrency",
            f"must not exceed remote.max_concurrency ({remote.max_concurrency}), "
            f"got {remote.min_concurrency}",
        )
    if remote.breaker_probe_initial_s > remote.breaker_probe_max_s:
        raise fail(
            "remote.breaker_probe_initial_s",
            f"must not exceed remote.breaker_probe_max_s ({remote.breaker_probe_max_s}), "
            f"got {remote.breaker_probe_initial_s}",
        )
    if remote.ca_bundle:
        try:
            _check_ca_bundle(remote.ca_bundle)
        except ValueError as exc:
            raise fail("remote.ca_bundle", str(exc)) from None

    def key_file(key: str, value: str, example: str = "/etc/forwarder/api_key") -> None:
        # The value is not echoed: a key pasted here instead of a path must not reach the
        # logs (as "cannot read file sk-...") nor check-config's output.
        if value and (not value.startswith("/") or "\0" in value):
            raise fail(
                key,
                f"must be an absolute path to the file holding the secret (e.g. {example}), "
                "not the secret itself; the value is not shown",
            )

    key_file("intake.auth_token_file", intake.auth_token_file, "/etc/forwarder/intake_token")
    key_file("remote.api_key_file", remote.api_key_file)

    accounts: dict[str, AccountConfig] = {}
    for name, account in sorted(config.accounts.items()):
        where = f"accounts.{name}"
        try:
            account_url = _normalise_base_url(account.base_url)
        except ValueError as exc:
            raise fail(f"{where}.base_url", str(exc)) from None
        if account.api_key_env and not _ENV_NAME_RE.fullmatch(account.api_key_env):
            # The value is not echoed: a key pasted here by mistake must not reach the logs.
            raise fail(
                f"{where}.api_key_env",
                "must be the name of an environment variable (letters, digits and _, "
                "not starting with a digit), not the key itself",
            )
        key_file(f"{where}.api_key_file", account.api_key_file)
        accounts[name] = dataclasses.replace(account, base_url=account_url)
    if remote.default_account != DEFAULT_ACCOUNT and remote.default_account not in accounts:
        hint = _suggest(remote.default_account, config.account_names())
        raise fail(
            "remote.default_account",
            f"no account named {_short(remote.default_account)}{hint}; "
            f"known accounts: {', '.join(config.account_names())}",
        )

    retry = config.retry
    if retry.initial_backoff_s > retry.max_backoff_s:
        raise fail(
            "retry.initial_backoff_s",
            f"must not exceed retry.max_backoff_s ({retry.max_backoff_s}), "
            f"got {retry.initial_backoff_s}",
        )

    if not config.state.dir:
        raise fail("state.dir", "must not be empty")

    _validate_fleet(config, fail)

    sections: dict[str, Any] = {
        name: dataclasses.replace(getattr(config, name), **values)
        for name, values in folded.items()
    }
    return dataclasses.replace(
        config,
        **sections,
        remote=dataclasses.replace(remote, base_url=base_url),
        accounts=accounts,
    )


def _validate_fleet(config: Config, fail: Callable[[str, str], ConfigError]) -> None:
    """The `[fleet]` rules a per-field bound cannot say: URL syntax, names, related timings."""
    fleet = config.fleet
    if fleet.redis_url:
        # The URL is not echoed: it may hold a password pasted by mistake.
        parts = urlsplit(fleet.redis_url)
        if parts.scheme not in _REDIS_SCHEMES:
            raise fail(
                "fleet.redis_url",
                f"must start with {', '.join(s + '://' for s in _REDIS_SCHEMES)}; "
                "the value is not shown",
            )
        if parts.password is not None:
            raise fail(
                "fleet.redis_url",
                "must not hold a password (it would be logged with the URL); put it in "
                "fleet.redis_password_file or the systemd credential redis_password; "
                "the value is not shown",
            )
        if parts.scheme == "unix" and not parts.path.startswith("/"):
            raise fail("fleet.redis_url", "a unix:// URL needs an absolute socket path")
        if parts.scheme != "unix" and not parts.hostname:
            raise fail("fleet.redis_url", "names no host; the value is not shown")
    if fleet.redis_password_file and (
        not fleet.redis_password_file.startswith("/") or "\0" in fleet.redis_password_file
    ):
        raise fail(
            "fleet.redis_password_file",
            "must be an absolute path to the file holding the password, not the password "
            "itself; the value is not shown",
        )
    if fleet.member and not _MEMBER_RE.fullmatch(fleet.member):
        raise fail(
            "fleet.member",
            "letters, digits, _, . and - only, 1 to 64, starting with a letter or digit, "
            f"got {_short(fleet.member)}",
        )
    if not _KEY_PREFIX_RE.fullmatch(fleet.key_prefix):
        raise fail(
            "fleet.key_prefix",
            f"letters, digits, _, ., : and - only, 1 to 64, got {_short(fleet.key_prefix)}",
        )
    # The timings matter only in a fleet: a host alone may have any remote.timeout_s.
    if fleet.enabled and fleet.claim_idle_s <= config.remote.timeout_s:
        raise fail(
            "fleet.claim_idle_s",
            f"must exceed remote.timeout_s ({config.remote.timeout_s}): an event still in a "
            f"request must not be claimed by another host, got {fleet.claim_idle_s}",
        )
    if fleet.enabled and fleet.lease_s >= fleet.claim_idle_s:
        raise fail(
            "fleet.lease_s",
            f"must be shorter than fleet.claim_idle_s ({fleet.claim_idle_s}), got {fleet.lease_s}",
        )


# --- rendering ----------------------------------------------------------------------------------

_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(value: str) -> str:
    out: list[str] = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(kind: _Kind, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "mode" and isinstance(value, int) and value >= 0:
        return f"0o{value:o}"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, float):
        return repr(value)  # repr keeps ".0"/exponent, and inf/nan are valid TOML too
    return str(value)


def _comment_safe(text: str) -> str:
    # A newline in a path must not end the comment and inject TOML.
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def _key_comment(key: ApiKey | None) -> str:
    return "not configured" if key is None else f"**** (from {_comment_safe(key.source)})"


# Settings whose values are secrets are shown as MASK when set.
MASK = "****"


def render_effective(
    config: Config,
    key: ApiKey | None,
    account_keys: Mapping[str, ApiKey] | None = None,
    intake_token: ApiKey | None = None,
) -> str:
    """The effective configuration as TOML, plus comments saying where the secrets come from.

    Every section and key is included, then every ``[accounts.NAME]`` table; the keys themselves
    never are, and ``intake.auth_token`` is masked. ``key`` is the default account's; with
    ``account_keys`` (from `credentials.resolve_account_keys`) each account table also says where
    its key comes from; ``intake_token`` (`credentials.resolve_intake_token`) likewise.
    """
    lines = ["# forwarder: effective configuration"]
    for name, kinds in _FIELD_KINDS.items():
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        for key_name, kind in kinds.items():
            value = getattr(section, key_name)
            if SETTINGS[f"{name}.{key_name}"].secret == "holds" and value:
                value = MASK
            lines.append(f"{key_name} = {_toml_value(kind, value)}")
    for name, account in sorted(config.accounts.items()):
        # A valid account name is a bare TOML key; quote anything else rather than break the TOML.
        header = name if _ACCOUNT_NAME_RE.fullmatch(name) else _toml_string(name)
        lines += ["", f"[accounts.{header}]"]
        for key_name, kind in _ACCOUNT_KINDS.items():
            lines.append(f"{key_name} = {_toml_value(kind, getattr(account, key_name))}")
        if account_keys is not None:
            lines.append(f"# api key of this account: {_key_comment(account_keys.get(name))}")
    lines.append("")
    lines.append(f"# intake auth token: {_key_comment(intake_token)}")
    lines.append(f"# api key: {_key_comment(key)}")
    return "\n".join(lines) + "\n"
