"""The checks a bound on one setting cannot say: other settings, the file system, syntax.

`validate_config` first applies every setting's declared bounds and choices (schema.py), then
the rules between settings (``remote.min_concurrency`` at most ``remote.max_concurrency``, ...),
addresses, URLs, paths and files; it returns the configuration with normalised values. What a
check says never shows the value of a setting that holds or names a secret.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from forwarder.config.address import is_loopback_host, parse_listen, resolve_group
from forwarder.config.schema import (
    ACCOUNT_SETTINGS,
    DEFAULT_ACCOUNT,
    MAX_UNIX_SOCKET_PATH,
    SETTINGS,
    AccountConfig,
    Config,
    ConfigError,
)
from forwarder.config.setting import bounds_error, short
from forwarder.config.tlsfiles import check_ca_bundle
from forwarder.fleet.topology import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    TLS_SCHEMES,
    BadRedisUrl,
    parse_cluster_url,
    parse_sentinel_url,
    scheme_of,
)

__all__ = ["check_exposure", "check_fleet", "suggest", "validate_config"]

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Redis URL schemes redis-py connects with: plain, TLS, a Unix socket.
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_MEMBER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def suggest(name: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {prefix}{matches[0]}?)" if matches else ""


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


def validate_config(config: Config, origins: Mapping[str, str]) -> Config:
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
        for key, meta in ACCOUNT_SETTINGS.items():
            error = bounds_error(meta, getattr(account, key))
            if error is not None:
                raise fail(f"accounts.{name}.{key}", error)

    intake = config.intake
    if intake.http_listen:
        try:
            parse_listen(intake.http_listen)
        except ValueError as exc:
            raise fail("intake.http_listen", str(exc)) from None
    if intake.unix_socket:
        size = len(os.fsencode(intake.unix_socket))
        if "\0" in intake.unix_socket:
            raise fail("intake.unix_socket", "must not contain a NUL character")
        if size > MAX_UNIX_SOCKET_PATH:
            raise fail(
                "intake.unix_socket",
                f"path too long for a unix socket ({size} bytes, at most {MAX_UNIX_SOCKET_PATH})",
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
            check_ca_bundle(remote.ca_bundle)
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
        hint = suggest(remote.default_account, config.account_names())
        raise fail(
            "remote.default_account",
            f"no account named {short(remote.default_account)}{hint}; "
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
    # After the rules between settings: a CA bundle without a TLS URL is named as such. The
    # client certificate and key are read at start (fleet.host.open_client), as the passwords.
    if config.fleet.ca_bundle:
        try:
            check_ca_bundle(config.fleet.ca_bundle)
        except ValueError as exc:
            raise fail("fleet.ca_bundle", str(exc)) from None

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


def _validate_redis_url(url: str, fail: Callable[[str, str], ConfigError]) -> None:
    """`fleet.redis_url`: one endpoint, Sentinel or Cluster. The URL is never echoed: it may
    hold a password pasted by mistake."""
    scheme = scheme_of(url)
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        try:
            (parse_sentinel_url if scheme in SENTINEL_SCHEMES else parse_cluster_url)(url)
        except BadRedisUrl as exc:
            raise fail("fleet.redis_url", str(exc)) from None
        return
    parts = urlsplit(url)
    if parts.scheme not in _REDIS_SCHEMES:
        raise fail(
            "fleet.redis_url",
            "must start with "
            f"{', '.join(s + '://' for s in _REDIS_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES)}; "
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


def check_fleet(config: Config) -> None:
    """The `[fleet]` rules between settings, for a configuration already loaded: a reload checks
    them against what will run (a reloaded `fleet.claim_idle_s` against the running
    `remote.timeout_s`, which needs a restart to change). Raises `ConfigError` naming the key."""
    _validate_fleet(config, lambda key, detail: ConfigError(f"{key}: {detail}"))


def _validate_fleet(config: Config, fail: Callable[[str, str], ConfigError]) -> None:
    """The `[fleet]` rules a per-field bound cannot say: URL syntax, names, related timings."""
    fleet = config.fleet
    if config.queue.mode == "fleet" and not fleet.redis_url:
        raise fail(
            "queue.mode", '"fleet" needs fleet.redis_url (the Redis server the fleet shares)'
        )
    if config.queue.mode == "fleet" and config.intake.accept_client_keys:
        # Another host could not deliver a client account's events: the key is this host's only.
        raise fail(
            "intake.accept_client_keys",
            'cannot be used with queue.mode "fleet": only the host that saw a client key could '
            "deliver its events; use configured accounts",
        )
    if fleet.redis_url:
        _validate_redis_url(fleet.redis_url, fail)
    for key, path in (
        ("fleet.redis_password_file", fleet.redis_password_file),
        ("fleet.sentinel_password_file", fleet.sentinel_password_file),
    ):
        if path and (not path.startswith("/") or "\0" in path):
            raise fail(
                key,
                "must be an absolute path to the file holding the password, not the password "
                "itself; the value is not shown",
            )
    _validate_fleet_tls(config, fail)
    if fleet.sentinel_password_file and scheme_of(fleet.redis_url) not in SENTINEL_SCHEMES:
        raise fail(
            "fleet.sentinel_password_file",
            "is the Sentinels' own password and needs a redis+sentinel:// or rediss+sentinel:// "
            "fleet.redis_url; a single server's password is fleet.redis_password_file",
        )
    if fleet.member and not _MEMBER_RE.fullmatch(fleet.member):
        raise fail(
            "fleet.member",
            "letters, digits, _, . and - only, 1 to 64, starting with a letter or digit, "
            f"got {short(fleet.member)}",
        )
    if not _KEY_PREFIX_RE.fullmatch(fleet.key_prefix):
        raise fail(
            "fleet.key_prefix",
            f"letters, digits, _, ., : and - only, 1 to 64, got {short(fleet.key_prefix)}",
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


def _validate_fleet_tls(config: Config, fail: Callable[[str, str], ConfigError]) -> None:
    """`fleet.ca_bundle`, `fleet.tls_cert_file`, `fleet.tls_key_file`: a TLS URL, both or
    neither of the pair, absolute paths. Neither the key file's path nor its content is shown."""
    fleet = config.fleet
    tls_url = scheme_of(fleet.redis_url) in TLS_SCHEMES
    for key, value in (
        ("fleet.ca_bundle", fleet.ca_bundle),
        ("fleet.tls_cert_file", fleet.tls_cert_file),
        ("fleet.tls_key_file", fleet.tls_key_file),
    ):
        if value and not tls_url:
            # A CA or a certificate for a plain connection would be silently unused.
            raise fail(
                key,
                "needs a TLS fleet.redis_url (rediss://, rediss+sentinel:// or "
                "rediss+cluster://); without TLS there is no certificate to verify or present",
            )
    if bool(fleet.tls_cert_file) != bool(fleet.tls_key_file):
        missing = "fleet.tls_key_file" if fleet.tls_cert_file else "fleet.tls_cert_file"
        present = "fleet.tls_cert_file" if fleet.tls_cert_file else "fleet.tls_key_file"
        raise fail(present, f"needs {missing} too: a client certificate goes with its key")
    for key, value in (
        ("fleet.tls_cert_file", fleet.tls_cert_file),
        ("fleet.tls_key_file", fleet.tls_key_file),
    ):
        if value and (not value.startswith("/") or "\0" in value):
            raise fail(key, "must be an absolute path; the value is not shown")
