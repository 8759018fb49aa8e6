"""Accounts: which remote account an event is delivered under, and each account's credentials.

Configured accounts are the `[remote]` section's own ("default") and every `[accounts.NAME]`.
An event names one by its `account` field or the `X-Forwarder-Account` header; otherwise it goes
to `remote.default_account`. With `intake.accept_client_keys`, an app that sends its own API key
by Basic auth on the drop-in endpoint gets an account of its own, named `client:` plus a digest
of the key: the key itself is kept in memory only, never in a log line, a stat or a file.

A client account is created only for a valid request (`Accounts.route` names it, intake validates
the request, `Accounts.open_client` creates it), and freed again once it has had nothing queued
or in delivery and no request for `CLIENT_IDLE_S` (`Accounts.free_idle`, which the daemon runs
every `CLIENT_SWEEP_S`): so made-up keys cannot use up the `MAX_CLIENT_KEYS` slots for good.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from forwarder.config.schema import DEFAULT_ACCOUNT, Config, ConfigError
from forwarder.ops.credentials import (
    ApiKey,
    Secret,
    check_key_text,
    resolve_account_keys,
    resolve_api_key,
)

CLIENT_PREFIX = "client:"
# A bound on accounts created by apps: each has a lane and a bucket of its own.
MAX_CLIENT_KEYS = 1000
# A client account with nothing queued or in delivery and no request for this long is freed
# (its lane, its metrics and its key in the log redactor go). Five minutes: several of the
# remote's rate windows (a minute), so freeing and re-creating an account never resets pacing
# that still matters, while slots taken by made-up keys come back soon.
CLIENT_IDLE_S = 300.0
# How often the daemon looks for idle client accounts; also the least time between two looks
# made because the bound was reached.
CLIENT_SWEEP_S = 30.0


@dataclass(frozen=True, slots=True)
class Account:
    """One account events can be delivered under."""

    name: str
    base_url: str
    key: Secret
    per_minute: int
    key_source: str


class AccountError(Exception):
    """An event asks for an account that cannot be used; the message says why."""

    def __init__(self, field: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def configured_accounts(
    config: Config, default_key: ApiKey | None, keys: Mapping[str, ApiKey]
) -> dict[str, Account]:
    """The accounts a configuration defines, given their resolved keys."""
    accounts: dict[str, Account] = {}
    if default_key is not None:
        accounts[DEFAULT_ACCOUNT] = Account(
            DEFAULT_ACCOUNT,
            config.remote.base_url,
            default_key.secret,
            config.remote.rate_limit_per_minute,
            default_key.source,
        )
    for name, table in config.accounts.items():
        key = keys[name]
        accounts[name] = Account(
            name, table.base_url, key.secret, table.rate_limit_per_minute, key.source
        )
    return accounts


NO_DEFAULT_KEY = (
    "no API key: set FORWARDER_API_KEY, remote.api_key_file, "
    "or a systemd credential named api_key ($CREDENTIALS_DIRECTORY/api_key)"
)


def load_accounts(config: Config, env: Mapping[str, str] | None = None) -> dict[str, Account]:
    """Resolve every account's key (blocking file reads); ConfigError if one cannot be used.

    The `[remote]` account is optional when `remote.default_account` names another one.
    """
    default_key = resolve_api_key(config, env)
    if default_key is None and config.remote.default_account == DEFAULT_ACCOUNT:
        raise ConfigError(NO_DEFAULT_KEY)
    return configured_accounts(config, default_key, resolve_account_keys(config, env))


def client_account_name(key: str) -> str:
    """The account name for an app's own key: a digest, so the key never shows."""
    return CLIENT_PREFIX + hashlib.sha256(key.encode("ascii")).hexdigest()[:16]


class Accounts:
    """Routes events to accounts; creates an account for each client key when allowed."""

    def __init__(
        self,
        accounts: Mapping[str, Account],
        *,
        default: str,
        accept_client_keys: bool,
        client_template: Account | None = None,
        on_new_client: Callable[[Account], None] = lambda account: None,
        on_clients_freed: Callable[[list[Account]], None] = lambda accounts: None,
        busy: Callable[[str], bool] = lambda name: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured: dict[str, Account] = dict(accounts)
        self.clients: dict[str, Account] = {}
        self.default = default
        self.accept_client_keys = accept_client_keys
        self._template = client_template
        self._on_new_client = on_new_client
        self._on_clients_freed = on_clients_freed
        # Whether a client account has events queued or in delivery (the daemon knows).
        self._busy = busy
        self._clock = clock
        self._last_used: dict[str, float] = {}  # client account -> last request or busy sighting
        self._swept_at = -CLIENT_SWEEP_S
        self.refused_at_cap = 0  # requests refused (503) because MAX_CLIENT_KEYS were open
        self.freed = 0  # idle client accounts freed since start

    def update(
        self,
        accounts: Mapping[str, Account],
        *,
        default: str,
        accept_client_keys: bool,
        client_template: Account | None,
    ) -> None:
        """Apply a reloaded configuration (client accounts are kept)."""
        self.configured = dict(accounts)
        self.default = default
        self.accept_client_keys = accept_client_keys
        self._template = client_template

    def route(self, requested: str, *, header: str = "", client_key: str | None = None) -> str:
        """The account an event goes to; raises AccountError naming the field at fault.

        An explicit account (the event's field, else the header) wins over a client key. A new
        client key's account is only named here; `open_client` creates it once the request is
        known to be valid.
        """
        if requested or header:
            name = requested or header
            field = "account" if requested else "X-Forwarder-Account"
            if name not in self.configured:
                known = ", ".join(sorted(self.configured)) or "none"
                raise AccountError(field, f"unknown account {name!r} (configured: {known})")
            return name
        if client_key is not None and self.accept_client_keys:
            return client_account_name(self._client_key(client_key))
        return self.default

    def _client_key(self, raw: str) -> str:
        try:
            key = check_key_text(raw)
        except ValueError as exc:
            raise AccountError("Authorization", f"client API key {exc}") from None
        if self._template is None:
            raise AccountError(
                "Authorization", "client keys need a default account to take base_url from"
            )
        return key

    def open_client(self, raw: str) -> str:
        """The account of the client key ``raw``, created if new; call it for valid requests.

        Raises AccountError: a malformed key (400), or 503 when `MAX_CLIENT_KEYS` accounts are
        open and none has been idle long enough to be freed (counted in `refused_at_cap`).
        """
        key = self._client_key(raw)
        name = client_account_name(key)
        now = self._clock()
        self._last_used[name] = now
        if name in self.clients:
            return name
        if len(self.clients) >= MAX_CLIENT_KEYS and now - self._swept_at >= CLIENT_SWEEP_S:
            self.free_idle()
        if len(self.clients) >= MAX_CLIENT_KEYS:
            del self._last_used[name]
            self.refused_at_cap += 1
            raise AccountError(
                "Authorization",
                f"too many distinct client API keys in use (at most {MAX_CLIENT_KEYS}; one is "
                f"freed after {CLIENT_IDLE_S:g} s with nothing to deliver); retry later",
                status=503,
            )
        assert self._template is not None  # checked by _client_key
        account = Account(
            name, self._template.base_url, Secret(key), self._template.per_minute, "client"
        )
        self.clients[name] = account
        self._on_new_client(account)
        return name

    def free_idle(self) -> list[Account]:
        """Free the client accounts idle for `CLIENT_IDLE_S`: nothing queued or in delivery
        (the `busy` callback) and no request. Returns them, after telling `on_clients_freed`."""
        now = self._clock()
        self._swept_at = now
        freed: list[Account] = []
        for name, account in list(self.clients.items()):
            if self._busy(name):
                self._last_used[name] = now  # idle time counts from the last event's outcome
            elif now - self._last_used.get(name, now) >= CLIENT_IDLE_S:
                del self.clients[name]
                self._last_used.pop(name, None)
                freed.append(account)
        if freed:
            self.freed += len(freed)
            self._on_clients_freed(freed)
        return freed
