"""Daemon configuration.

A TOML file (``/etc/forwarder/forwarder.toml`` by default) is read into frozen dataclasses, one per
section; ``FORWARDER_<SECTION>_<KEY>`` environment variables override single keys; the result is
checked strictly, and every error names the offending key or variable. The remote API key is not a
setting: `credentials.resolve_api_key` finds it in the environment, a file or a systemd credential.

Besides the ``[remote]`` section's own account (named ``default``), ``[accounts.NAME]`` tables
declare further accounts of the same API; `credentials.resolve_account_keys` finds their keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import math
import os
import re
import ssl
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

if typing.TYPE_CHECKING:
    from forwarder.ops.credentials import ApiKey

__all__ = [
    "DEFAULT_ACCOUNT",
    "DEFAULT_CONFIG_PATH",
    "AccountConfig",
    "Config",
    "ConfigError",
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
_DROP_IN_ANSWERS = ("remote", "accepted")

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

    http_listen: str = "127.0.0.1:8787"
    unix_socket: str = ""
    unix_socket_mode: int = 0o660
    # Group of the socket file, a name or a gid; "" leaves the daemon's own group.
    unix_socket_group: str = ""
    max_body_bytes: int = 1_048_576
    max_batch: int = 1000
    # Slow and idle clients (connections.py): a request's head must arrive within
    # header_timeout_s, its body within body_timeout_s; an idle kept-alive connection closes
    # after keepalive_timeout_s; at most max_connections are open at once. An answer may wait
    # on a full socket (a client that does not read) write_timeout_s, then the connection closes.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    write_timeout_s: float = 10.0
    max_connections: int = 512
    # On the drop-in endpoint, deliver under the API key the client sends by Basic auth.
    accept_client_keys: bool = False
    # The token every request but GET /healthz must carry (credentials.resolve_intake_token);
    # required when a TCP listener is not on loopback. Never shown: repr=False, masked on output.
    auth_token: str = field(default="", repr=False)
    auth_token_file: str = ""
    # The drop-in endpoint's answer: "remote" is the remote's own (200, data = the event
    # number); "accepted" is 202 with data = {"id": event_id, "status": "queued"}.
    drop_in_answer: str = "remote"

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

    mode: str = "memory"
    max_events: int = 100_000
    # Estimated bytes of the events in memory (their text as held, plus an overhead each;
    # queue.event_size). Sized to fit systemd/forwarder.service's MemoryMax.
    max_bytes: int = 268_435_456
    max_disk_bytes: int = 1_073_741_824
    # Durable mode: the longest a group commit waits for company while requests keep arriving
    # (it is cut at once when they stop); more is fewer fsyncs for more latency under load.
    group_commit_ms: float = 8.0
    # Events of an account without a delivery lane (removed from the config, or a client key not
    # presented since a restart) are held apart from max_events: at most this many in memory...
    held_max_events: int = 1000
    # ...and each at most this long after it was accepted; then it is dead-lettered.
    held_max_age_s: float = 86_400.0


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """``[remote]``: the direct-mail API the events are delivered to."""

    base_url: str = "https://api-eu1.stannp.com/v1"
    api_key_file: str = ""
    # The account's request quota; [accounts.NAME] tables inherit it unless they set their own.
    rate_limit_per_minute: int = 300
    # 0: adaptive between min_concurrency and max_concurrency; N: fixed at N.
    concurrency: int = 0
    min_concurrency: int = 1
    max_concurrency: int = 64
    # Deliver the events of one account and recipient_id in the order they were accepted.
    per_recipient_order: bool = True
    # Consecutive transient failures that open the circuit breaker, then the probe interval.
    breaker_failures: int = 5
    breaker_probe_initial_s: float = 1.0
    breaker_probe_max_s: float = 60.0
    default_account: str = DEFAULT_ACCOUNT
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    auth_retry_s: float = 60.0
    # A PEM file of CA certificates that replaces the system's trust store; "": the system's.
    ca_bundle: str = ""


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``[retry]``: exponential backoff for failed deliveries."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    max_elapsed_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where durable state lives.

    The dataclass default is the fixed fallback; :func:`load_config` uses systemd's
    ``STATE_DIRECTORY`` instead when the key is not set anywhere.
    """

    dir: str = _FALLBACK_STATE_DIR
    # How long an event's outcome is kept for GET /v1/events/{id} (the remote's idempotency
    # window), and how many outcomes memory holds at most (the oldest are forgotten first).
    outcome_retention_s: float = 86_400.0
    outcome_max_count: int = 20_000

    @property
    def path(self) -> Path:
        """The state directory as a path."""
        return Path(self.dir)


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """``[shutdown]``: graceful shutdown."""

    timeout_s: float = 20.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: logging level and output format."""

    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """``[accounts.NAME]``: a further account of the remote API, with its own key and quota.

    After :func:`load_config`, ``base_url`` and ``rate_limit_per_minute`` hold the effective
    values: those of ``[remote]`` unless the table sets its own. The key comes from the variable
    named by ``api_key_env``, else ``api_key_file``, else the systemd credential ``api_key.NAME``.
    """

    name: str
    base_url: str = ""
    api_key_file: str = ""
    api_key_env: str = ""
    rate_limit_per_minute: int = 0


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
}

# Octal file modes are ints but also accept strings of octal digits ("0660").
_MODE_KEYS = frozenset({"intake.unix_socket_mode"})

_EXPECTED: dict[_Kind, str] = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "mode": 'an octal mode (0o660 or "0660")',
    "bool": "a boolean (true or false)",
}


def _field_kinds(section: str, cls: type[Any]) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    by_type: dict[object, _Kind] = {str: "str", int: "int", float: "float", bool: "bool"}
    kinds: dict[str, _Kind] = {}
    for f in dataclasses.fields(cls):
        kinds[f.name] = "mode" if f"{section}.{f.name}" in _MODE_KEYS else by_type[hints[f.name]]
    return kinds


_FIELD_KINDS: dict[str, dict[str, _Kind]] = {
    name: _field_kinds(name, cls) for name, cls in _SECTIONS.items()
}
# The keys of an [accounts.NAME] table: `name` is the table's name, not a key in it.
_ACCOUNT_KINDS: dict[str, _Kind] = {
    key: kind for key, kind in _field_kinds("accounts", AccountConfig).items() if key != "name"
}


# --- value conversion ---------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OCTAL_RE = re.compile(r"(?:0[oO])?([0-7]+)")
_ENV_BOOLS = {"true": True, "1": True, "yes": True, "on": True}
_ENV_BOOLS |= {"false": False, "0": False, "no": False, "off": False}


# Settings that hold a secret, or name where one is and so may hold one pasted by mistake (a
# token in auth_token_file, a key in api_key_env): no error about them ever shows their value,
# whatever the mistake (a wrong type, a relative path, an unreadable file). See `_secret_key`.
_SECRET_SETTINGS = frozenset({"intake.auth_token", "intake.auth_token_file", "remote.api_key_file"})
_SECRET_ACCOUNT_KEYS = frozenset({"api_key_file", "api_key_env"})
# A value this short is no secret worth hiding, and scrubbing it would garble the message.
_MIN_SCRUBBED_CHARS = 6
NOT_SHOWN = "<not shown>"


def _secret_key(key: str) -> bool:
    """Whether ``section.key`` (or ``accounts.NAME.key``) holds or names a secret."""
    if key.startswith("accounts."):
        return key.rpartition(".")[2] in _SECRET_ACCOUNT_KEYS
    return key in _SECRET_SETTINGS


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

    def at_least(key: str, value: int, low: int) -> None:
        if value < low:
            raise fail(key, f"must be at least {low}, got {value}")

    def within(key: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            raise fail(key, f"must be within {low}..{high}, got {value}")

    def positive(key: str, value: float) -> None:
        # `not (value > 0)` also catches NaN.
        if not (value > 0) or not math.isfinite(value):
            raise fail(key, f"must be a positive number of seconds, got {value}")

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
    if not 0 <= intake.unix_socket_mode <= 0o777:
        raise fail(
            "intake.unix_socket_mode",
            f"must be within 0o000..0o777, got {intake.unix_socket_mode:#o}",
        )
    if intake.unix_socket_group:
        try:
            resolve_group(intake.unix_socket_group)
        except ValueError as exc:
            raise fail("intake.unix_socket_group", str(exc)) from None
    at_least("intake.max_body_bytes", intake.max_body_bytes, 1024)
    at_least("intake.max_batch", intake.max_batch, 1)
    positive("intake.header_timeout_s", intake.header_timeout_s)
    positive("intake.body_timeout_s", intake.body_timeout_s)
    positive("intake.keepalive_timeout_s", intake.keepalive_timeout_s)
    positive("intake.write_timeout_s", intake.write_timeout_s)
    within("intake.max_connections", intake.max_connections, 1, 1_000_000)
    if intake.drop_in_answer not in _DROP_IN_ANSWERS:
        allowed = ", ".join(_DROP_IN_ANSWERS)
        raise fail(
            "intake.drop_in_answer",
            f"must be one of {allowed}; got {_short(intake.drop_in_answer)}",
        )
    at_least("queue.max_events", config.queue.max_events, 1)
    at_least("queue.max_bytes", config.queue.max_bytes, 1_048_576)
    if config.queue.mode not in _QUEUE_MODES:
        allowed = ", ".join(_QUEUE_MODES)
        raise fail("queue.mode", f"must be one of {allowed}; got {_short(config.queue.mode)}")
    at_least("queue.max_disk_bytes", config.queue.max_disk_bytes, 1_048_576)
    group_ms = config.queue.group_commit_ms
    if not (0 <= group_ms <= _MAX_GROUP_COMMIT_MS):  # `not (...)` also catches NaN
        raise fail(
            "queue.group_commit_ms",
            f"must be within 0..{_MAX_GROUP_COMMIT_MS:g} milliseconds, got {group_ms}",
        )

    within("queue.held_max_events", config.queue.held_max_events, 1, _MAX_HELD_EVENTS)
    positive("queue.held_max_age_s", config.queue.held_max_age_s)

    remote = config.remote
    try:
        base_url = _normalise_base_url(remote.base_url)
    except ValueError as exc:
        raise fail("remote.base_url", str(exc)) from None
    within("remote.rate_limit_per_minute", remote.rate_limit_per_minute, 1, _MAX_RATE_LIMIT)
    within("remote.concurrency", remote.concurrency, 0, _MAX_CONCURRENCY)
    within("remote.min_concurrency", remote.min_concurrency, 1, _MAX_CONCURRENCY)
    within("remote.max_concurrency", remote.max_concurrency, 1, _MAX_CONCURRENCY)
    if remote.min_concurrency > remote.max_concurrency:
        raise fail(
            "remote.min_concurrency",
            f"must not exceed remote.max_concurrency ({remote.max_concurrency}), "
            f"got {remote.min_concurrency}",
        )
    within("remote.breaker_failures", remote.breaker_failures, 1, 10_000)
    positive("remote.breaker_probe_initial_s", remote.breaker_probe_initial_s)
    positive("remote.breaker_probe_max_s", remote.breaker_probe_max_s)
    if remote.breaker_probe_initial_s > remote.breaker_probe_max_s:
        raise fail(
            "remote.breaker_probe_initial_s",
            f"must not exceed remote.breaker_probe_max_s ({remote.breaker_probe_max_s}), "
            f"got {remote.breaker_probe_initial_s}",
        )
    positive("remote.timeout_s", remote.timeout_s)
    positive("remote.connect_timeout_s", remote.connect_timeout_s)
    positive("remote.auth_retry_s", remote.auth_retry_s)
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
        within(f"{where}.rate_limit_per_minute", account.rate_limit_per_minute, 1, _MAX_RATE_LIMIT)
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
    positive("retry.initial_backoff_s", retry.initial_backoff_s)
    positive("retry.max_backoff_s", retry.max_backoff_s)
    positive("retry.max_elapsed_s", retry.max_elapsed_s)
    if retry.initial_backoff_s > retry.max_backoff_s:
        raise fail(
            "retry.initial_backoff_s",
            f"must not exceed retry.max_backoff_s ({retry.max_backoff_s}), "
            f"got {retry.initial_backoff_s}",
        )

    if not config.state.dir:
        raise fail("state.dir", "must not be empty")
    positive("state.outcome_retention_s", config.state.outcome_retention_s)
    within("state.outcome_max_count", config.state.outcome_max_count, 0, 100_000_000)
    positive("shutdown.timeout_s", config.shutdown.timeout_s)

    level = config.log.level.lower()
    if level not in _LOG_LEVELS:
        raise fail("log.level", f"must be one of {', '.join(_LOG_LEVELS)}; got {_short(level)}")
    log_format = config.log.format.lower()
    if log_format not in _LOG_FORMATS:
        raise fail(
            "log.format", f"must be one of {', '.join(_LOG_FORMATS)}; got {_short(log_format)}"
        )

    return dataclasses.replace(
        config,
        remote=dataclasses.replace(remote, base_url=base_url),
        log=LogConfig(level=level, format=log_format),
        accounts=accounts,
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


# Settings whose values are secrets: shown as MASK when set.
_SECRET_KEYS = frozenset({"intake.auth_token"})
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
            if f"{name}.{key_name}" in _SECRET_KEYS and value:
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
