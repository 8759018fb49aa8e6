"""The settings: a frozen dataclass per section, every setting declared once on its field.

Each setting is a ``setting(default, doc=..., lo=..., reload=..., secret=...)`` field of its
section (forwarder/config/setting.py): its range check (validate.py), whether a reload applies it
(`RESTART_ONLY`), `check-config`'s masking (render.py), the shipped config/forwarder.toml and the
reference page's key table (generate.py) all come from that declaration. `SETTINGS`,
`FIELD_KINDS` and the account tables' counterparts are the views of it the other modules read.

Besides the ``[remote]`` section's own account (named ``default``), ``[accounts.NAME]`` tables
declare further accounts of the same API; `credentials.resolve_account_keys` finds their keys.
The remote API key is not a setting: `credentials.resolve_api_key` finds it in the environment,
a file or a systemd credential.

Reading the TOML file and the ``FORWARDER_*`` environment is load.py's, the checks a bound on one
field cannot say validate.py's, the effective configuration as TOML render.py's. This module is
over 400 lines because of the declarations: each setting's default, bounds, reload behaviour and
documentation are the schema, and the sections stay one table that every derived view reads.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from forwarder.config.address import parse_listen
from forwarder.config.setting import Setting, setting, settings_of

__all__ = [
    "ACCOUNT_KINDS",
    "ACCOUNT_SETTINGS",
    "DEFAULT_ACCOUNT",
    "FIELD_KINDS",
    "RESTART_ONLY",
    "SECTIONS",
    "SETTINGS",
    "AccountConfig",
    "Config",
    "ConfigError",
    "FleetConfig",
    "IntakeConfig",
    "Kind",
    "LogConfig",
    "QueueConfig",
    "RemoteConfig",
    "RetryConfig",
    "ShutdownConfig",
    "StateConfig",
    "is_secret_key",
]

FALLBACK_STATE_DIR = "/var/lib/forwarder"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_SOCKET_PATH = 107
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("auto", "json", "console")
_QUEUE_MODES = ("memory", "durable", "fleet")

# The [remote] section's own account: events that name no account go here by default.
DEFAULT_ACCOUNT = "default"
# Same rule as events.ACCOUNT_RE (events name their account); kept here so config imports nothing.
ACCOUNT_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
        bounds=f'a path of at most {MAX_UNIX_SOCKET_PATH} bytes, no NUL; `""` disables it',
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
            return parse_listen(self.http_listen)
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
        "together share one commit) before\nthe app gets its 202, and survives any crash. "
        '"fleet": events go to Redis streams shared by\nevery host of the fleet (needs '
        "fleet.redis_url; the local spool while Redis is unreachable).",
        choices=_QUEUE_MODES,
        # The storage backend is chosen when the spool is opened.
        reload=False,
        applied="restart ¹",
        ref='`"durable"`: every event is committed to `state.dir/spool.db` (fsynced) before '
        'intake answers; `"memory"`: events wait in memory and a clean stop saves the rest into '
        "the spool (see [Durability](../explanation/durability.md)); "
        '`"fleet"`: events go to Redis streams every host of the fleet delivers from '
        "([Fleet mode](../how-to/fleet.md))",
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

    The dataclass default is the fixed fallback; `load.load_config` uses systemd's
    ``STATE_DIRECTORY`` instead when the key is not set anywhere.
    """

    dir: str = setting(
        FALLBACK_STATE_DIR,
        doc="Directory for durable state. If this key is absent, systemd's $STATE_DIRECTORY\n"
        "(StateDirectory=) is used, else /var/lib/forwarder. It must be ours and not writable\n"
        "by group or others (0700 is made if it is missing); one daemon at a time uses it.",
        reload=False,
        default_doc=f'`$STATE_DIRECTORY` or `"{FALLBACK_STATE_DIR}"`',
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
        "spool for the whole period; a\nfleet's shared queue in Redis, at most outcome_max_count "
        "per account.",
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
        "`0`: none); durable mode also keeps them in the spool for the whole retention; a "
        "fleet's shared queue keeps at most this many per account in Redis too (about 250 "
        "bytes each), and the numbers of as many events accepted here",
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


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """``[fleet]``: many hosts sharing one account's rate budget (and queue) through Redis."""

    redis_url: str = setting(
        "",
        doc='Redis 7 shared by the fleet: "redis://host:6379/0", "rediss://host:6380/0" (TLS),\n'
        '"unix:///run/redis/redis.sock", a master found through Sentinel:\n'
        '"redis+sentinel://s1:26379,s2:26379/MASTERNAME/0" ("rediss+sentinel://": TLS), or a\n'
        'Redis Cluster: "redis+cluster://n1:6379,n2:6379" (startup nodes; "rediss+cluster://":\n'
        'TLS; database 0 only). "" (the default): no fleet, every budget is this host\'s own.\n'
        "No password in the URL: it comes from redis_password_file or the systemd "
        "credential\nredis_password (the data nodes'; the Sentinels' own: "
        "sentinel_password_file), so it\nnever reaches a log.",
        secret="names",
        reload=False,
        example="rediss://redis.internal:6380/0",
        bounds="a `redis://`, `rediss://`, `unix://`, `redis+sentinel://`, `rediss+sentinel://`, "
        '`redis+cluster://` or `rediss+cluster://` URL without a password; `""`: off',
        ref="the Redis server the fleet shares ; set, the "
        "accounts' rate budgets are shared by every host that names the same server and prefix",
    )
    redis_password_file: str = setting(
        "",
        doc="File holding the Redis password (then the systemd credential redis_password).\n"
        "Read at start (a change needs a restart: redis-py cannot change a running pool's "
        "password,\nand a restart hands the partitions over losing nothing).",
        secret="names",
        # Rotation is a rolling restart with both passwords valid meanwhile (an ACL user's
        # `>NEW` before `<OLD`): redis-py has no public way to change the pool's password, and
        # a restart is a clean hand-over (docs/how-to/fleet.md).
        reload=False,
        bounds="an absolute path",
        ref="file holding the Redis password (`AUTH`); without it the systemd credential "
        "`redis_password` is used when present, else no password. Read at start; rotate it with "
        "a rolling restart (see [Fleet mode](../how-to/fleet.md#redis-as-run-in-production))",
    )
    sentinel_password_file: str = setting(
        "",
        doc="With a Sentinel URL: file holding the Sentinels' own password (their requirepass), "
        "then the\nsystemd credential sentinel_password; without either the Sentinels are asked "
        "without one.",
        secret="names",
        # Read when the client is made, as redis_password_file.
        reload=False,
        bounds="an absolute path; only with a `redis+sentinel://` or `rediss+sentinel://` URL",
        ref="file holding the Sentinels' password (their `requirepass`); without it the systemd "
        "credential `sentinel_password` is used when present (with a Sentinel URL only), else "
        "none. Read at start, as `redis_password_file`",
    )
    ca_bundle: str = setting(
        "",
        doc="With a TLS URL (rediss://...): a PEM file of CA certificates to verify Redis's "
        'certificate\nwith (a private CA), trusted besides the system\'s trust store; "" uses '
        "the system's only.\nCertificates and host names are always verified: there is no "
        "switch to turn that off.",
        reload=False,
        bounds="a readable PEM file holding at least one CA certificate; only with a "
        '`rediss://`, `rediss+sentinel://` or `rediss+cluster://` URL; `""`: the system\'s '
        "trust store",
        ref="CA certificates to verify Redis's certificate with (every node and Sentinel), "
        "besides the system's trust store (redis-py adds them to it). Certificates and host "
        "names are always verified",
    )
    tls_cert_file: str = setting(
        "",
        doc="With a TLS URL: the client certificate (PEM, with any intermediate CA after it) "
        "forwarder\npresents to Redis (tls-auth-clients yes, Redis's default); set with "
        "tls_key_file, or neither.",
        reload=False,
        bounds="an absolute path to a readable PEM certificate; with `fleet.tls_key_file` and "
        "a `rediss://`, `rediss+sentinel://` or `rediss+cluster://` URL",
        ref="the client certificate presented to every Redis node and Sentinel (mutual TLS: "
        "Redis's `tls-auth-clients yes`). Checked at start",
    )
    tls_key_file: str = setting(
        "",
        doc="The private key of tls_cert_file (unencrypted PEM; protect it with file "
        "permissions).\nChecked at start; its content is never shown.",
        secret="names",
        reload=False,
        bounds="an absolute path to a readable, unencrypted PEM private key matching "
        "`fleet.tls_cert_file`",
        ref="the client certificate's private key (a secret file: readable by forwarder's "
        "user only, e.g. a systemd credential's path). Checked at start; neither its path nor "
        "its content appears in an error",
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
        doc="A dead member's unacknowledged events are taken over after this long (longer than "
        "a request's\nremote.timeout_s). A reload applies it to the partitions acquired from then "
        "on.",
        unit="seconds",
        bounds="seconds, more than `remote.timeout_s` and `fleet.lease_s` (in a fleet)",
        applied="reload (partitions acquired from then on)",
        ref="how long an event handed to a member may stay unacknowledged before another member "
        "claims it; must exceed `remote.timeout_s`. A reload is refused unless it exceeds the "
        "running `remote.timeout_s`; it applies to the partitions acquired from then on (one "
        "already waiting keeps its deadline, which was safe)",
    )
    lease_s: float = setting(
        10.0,
        doc="A partition's lease: renewed every lease_s / 3; a host that cannot renew stops "
        "delivering\nfrom it before the lease ends. A reload applies it at once: the held leases "
        "are renewed\nfor the new length. Set the same on every host.",
        unit="seconds",
        bounds="seconds, less than `fleet.claim_idle_s` (in a fleet)",
        applied="reload (the next renewal, at once)",
        ref="how long a host owns a partition without renewing it; a stopped or cut-off host's "
        "partitions move to the others after this. A reload renews the held leases for the new "
        "length at once; hosts whose values differ meanwhile only move partitions around (the "
        "leases fence every settle)",
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


Kind = Literal["str", "int", "float", "mode", "bool"]

SECTIONS: dict[str, type[Any]] = {
    "intake": IntakeConfig,
    "queue": QueueConfig,
    "remote": RemoteConfig,
    "retry": RetryConfig,
    "state": StateConfig,
    "shutdown": ShutdownConfig,
    "log": LogConfig,
    "fleet": FleetConfig,
}


def _field_kinds(cls: type[Any]) -> dict[str, Kind]:
    hints = typing.get_type_hints(cls)
    by_type: dict[object, Kind] = {str: "str", int: "int", float: "float", bool: "bool"}
    # Octal file modes are ints but also accept strings of octal digits ("0660").
    return {
        f.name: "mode" if meta.octal else by_type[hints[f.name]] for f, meta in settings_of(cls)
    }


FIELD_KINDS: dict[str, dict[str, Kind]] = {
    name: _field_kinds(cls) for name, cls in SECTIONS.items()
}
# The keys of an [accounts.NAME] table (`name` is the table's name, not a setting).
ACCOUNT_KINDS: dict[str, Kind] = _field_kinds(AccountConfig)
# Every setting's declaration by `section.key` (and an account table's by key).
SETTINGS: dict[str, Setting] = {
    f"{name}.{f.name}": meta for name, cls in SECTIONS.items() for f, meta in settings_of(cls)
}
ACCOUNT_SETTINGS: dict[str, Setting] = {f.name: meta for f, meta in settings_of(AccountConfig)}
# Settings a reload cannot change in a running process: they need a restart.
RESTART_ONLY: tuple[str, ...] = tuple(key for key, meta in SETTINGS.items() if not meta.reload)


# Settings that hold a secret, or name where one is and so may hold one pasted by mistake (a
# token in auth_token_file, a key in api_key_env): no error about them ever shows their value,
# whatever the mistake (a wrong type, a relative path, an unreadable file). See `is_secret_key`.
SECRET_ACCOUNT_KEYS = frozenset(key for key, meta in ACCOUNT_SETTINGS.items() if meta.secret)


def is_secret_key(key: str) -> bool:
    """Whether ``section.key`` (or ``accounts.NAME.key``) holds or names a secret."""
    if key.startswith("accounts."):
        return key.rpartition(".")[2] in SECRET_ACCOUNT_KEYS
    meta = SETTINGS.get(key)
    return meta is not None and meta.secret != ""
