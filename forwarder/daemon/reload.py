"""A reload: read the configuration again and apply what changed to the running components.

The settings declared `reload=False` (`schema.RESTART_ONLY`) keep their running values and are
named in the `reloaded` line as needing a restart. Of the others, a setting a component holds a
copy of is set there by `APPLY` when it changed; the rest are read where they are used: the
accounts' and the lanes' settings (`remote.*`, `retry.*`) are handed to every lane again, the
intake token is resolved again, `shutdown.timeout_s` is read at the stop.

The rules between settings are checked again on what will run, the new values with the running
restart-only ones: a reload whose `fleet.claim_idle_s` does not exceed the running
`remote.timeout_s` is refused, whatever the file says of the timeout. The fleet's lease timings
go to the shared queue (queue.mode "fleet"): the leases are renewed for the new `lease_s` at
once, and partitions acquired from then on wait the new `claim_idle_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from forwarder.config.schema import RESTART_ONLY, Config, ConfigError
from forwarder.config.validate import check_exposure, check_fleet
from forwarder.daemon.listeners import ensure_fd_room, exposed_listeners
from forwarder.delivery.lane import LaneSettings
from forwarder.intake.accounts import Account
from forwarder.ops.credentials import resolve_intake_token
from forwarder.ops.logs import set_log_level, set_secrets

if TYPE_CHECKING:
    from forwarder.daemon.lifecycle import Daemon
    from forwarder.fleet.host import SharedQueue

log = structlog.get_logger("forwarder.daemon")

# What a reload reads: the new config and its accounts (keys resolved), or a ConfigError.
Loader = Callable[[], tuple[Config, dict[str, Account]]]
Apply = Callable[["Daemon", Any], None]


def _set(owner: Callable[[Daemon], object | None], attribute: str) -> Apply:
    """An `Apply` that sets `attribute` on the component `owner` returns (none yet: nothing)."""

    def apply(daemon: Daemon, value: Any) -> None:
        target = owner(daemon)
        if target is not None:
            setattr(target, attribute, value)

    return apply


def _group_commit(daemon: Daemon, value: Any) -> None:
    if daemon.log is not None:
        daemon.log.set_group_commit(value / 1000)


def _max_connections(daemon: Daemon, value: Any) -> None:
    daemon.connections.max_connections = value
    ensure_fd_room(value)


def _shared_queue(daemon: Daemon, apply: Callable[[SharedQueue], None]) -> None:
    """Apply to the fleet's shared queue; in another queue.mode the leases' timings are unused."""
    if daemon.fleet is not None and daemon.fleet.queue is not None:
        apply(daemon.fleet.queue)


# The reloadable settings a component keeps a copy of, and how a changed value is set there.
APPLY: dict[str, Apply] = {
    "intake.max_batch": _set(lambda d: d._state, "max_batch"),
    "intake.body_timeout_s": _set(lambda d: d._state, "body_timeout_s"),
    "intake.drop_in_answer": _set(lambda d: d._state, "drop_in_answer"),
    "intake.header_timeout_s": _set(lambda d: d.connections, "header_timeout_s"),
    "intake.keepalive_timeout_s": _set(lambda d: d.connections, "keepalive_timeout_s"),
    "intake.write_timeout_s": _set(lambda d: d.connections, "write_timeout_s"),
    "intake.max_connections": _max_connections,
    "queue.max_events": _set(lambda d: d.queue, "max_events"),
    "queue.max_bytes": _set(lambda d: d.queue, "max_bytes"),
    "queue.group_commit_ms": _group_commit,
    "queue.held_max_events": _set(lambda d: d.held, "max_events"),
    "queue.held_max_age_s": _set(lambda d: d.held, "max_age_s"),
    "remote.per_recipient_order": lambda d, v: d.queue.set_ordered(v),
    "state.outcome_retention_s": _set(lambda d: d.log.status if d.log else None, "retention_s"),
    "state.outcome_max_count": _set(lambda d: d.log.status if d.log else None, "max_count"),
    "log.level": lambda _d, v: set_log_level(v),
    "fleet.lease_s": lambda d, v: _shared_queue(d, lambda q: q.set_lease_s(v)),
    "fleet.claim_idle_s": lambda d, v: _shared_queue(d, lambda q: q.set_claim_idle_s(v)),
}
# Reloadable settings applied without `APPLY`: read again where they are used (see above).
APPLIED_ELSEWHERE: frozenset[str] = frozenset(
    {
        "intake.accept_client_keys",
        "intake.auth_token",
        "intake.auth_token_file",
        "remote.default_account",
        "remote.base_url",
        "remote.api_key_file",
        "remote.rate_limit_per_minute",
        "remote.concurrency",
        "remote.min_concurrency",
        "remote.max_concurrency",
        "remote.breaker_failures",
        "remote.breaker_probe_initial_s",
        "remote.breaker_probe_max_s",
        "remote.auth_retry_s",
        "retry.initial_backoff_s",
        "retry.max_backoff_s",
        "retry.max_elapsed_s",
        "shutdown.timeout_s",
    }
)


async def reload(
    daemon: Daemon, loader: Callable[[], tuple[Config, dict[str, Account]]] | None
) -> bool:
    """Read the configuration again (`loader`) and apply it; a bad one is refused."""
    if loader is None or daemon._dispatcher is None or daemon.shutting_down:
        log.warning("reload_skipped", reason="not running")
        return False
    daemon.notifier.reloading("reloading the configuration")
    applied = False
    try:
        try:
            # Reading files (config, key files) is blocking: off the event loop.
            config, accounts = await asyncio.to_thread(loader)
        except ConfigError as exc:
            log.error("reload_refused", error=str(exc), action="the running configuration stays")
        else:
            applied = await apply_reload(daemon, config, accounts)
    finally:
        # READY=1 after RELOADING=1 in every case, or systemd waits out its reload timeout.
        daemon.notifier.ready(daemon.view.status_line(prefix="" if applied else "reload refused; "))
    return applied


async def apply_reload(daemon: Daemon, config: Config, accounts: dict[str, Account]) -> bool:
    """Check a newly read configuration and apply it; a bad one is refused (returns False)."""
    old = daemon.config
    changed = changed_keys(old, config)
    restart_needed = [key for key in changed if key in RESTART_ONLY]
    # What cannot change at run time keeps its running value, so `daemon.config` stays true.
    for key in restart_needed:
        section, name = key.split(".", 1)
        running = getattr(getattr(old, section), name)
        config = dataclasses.replace(
            config,
            **{section: dataclasses.replace(getattr(config, section), **{name: running})},
        )
    try:
        if config.remote.default_account not in accounts:
            raise ConfigError(
                f"remote.default_account: no API key for account {config.remote.default_account!r}"
            )
        # The loader checked the file's values; what will run mixes them with the running
        # restart-only ones (a new fleet.claim_idle_s against the running remote.timeout_s).
        check_fleet(config)
        # Reading a token file is blocking: off the event loop.
        token = await asyncio.to_thread(resolve_intake_token, config)
        # Against the listeners serving now: their addresses need a restart to change.
        check_exposure(exposed_listeners(daemon.activated, daemon.config), token is not None)
    except ConfigError as exc:
        kept = f" ({', '.join(restart_needed)} keep their running values)" if restart_needed else ""
        log.error("reload_refused", error=f"{exc}{kept}", action="the running configuration stays")
        return False
    daemon.config = config
    for key in changed:
        if key in APPLY:
            section, name = key.split(".", 1)
            APPLY[key](daemon, getattr(getattr(config, section), name))
    daemon.intake_token = token
    assert daemon._state is not None
    daemon._state.auth_token = token.secret if token else None
    previous = dict(daemon.accounts.configured)
    daemon.accounts.update(
        accounts,
        default=config.remote.default_account,
        accept_client_keys=config.intake.accept_client_keys,
        client_template=accounts[config.remote.default_account],
    )
    added, removed = _apply_accounts(daemon, accounts, config, previous)
    set_secrets(daemon.lanes.secrets())
    daemon.reloads += 1
    log.info(
        "reloaded",
        changed=changed,
        accounts_added=added,
        accounts_removed=removed,
        **({"restart_needed": restart_needed} if restart_needed else {}),
    )
    return True


def _apply_accounts(
    daemon: Daemon, accounts: dict[str, Account], config: Config, previous: dict[str, Account]
) -> tuple[list[str], list[str]]:
    """Every lane gets its settings again; new accounts get a lane, removed ones are retired."""
    dispatcher = daemon._dispatcher
    assert dispatcher is not None
    lanes = dispatcher.lanes
    added: list[str] = []
    for name, account in accounts.items():
        lane = lanes.get(name)
        if lane is None:
            daemon.lanes.add_lane(account)
            added.append(name)
            continue
        lane.retired = False
        current = previous.get(name)
        sender = None
        if current is None or (current.base_url, current.key) != (account.base_url, account.key):
            sender = daemon.lanes.sender(account)
        lane.configure(daemon.lanes.lane_settings(account, config), sender)
    template = accounts[config.remote.default_account]
    for name, client in daemon.accounts.clients.items():
        lane = lanes.get(name)
        if lane is not None:
            settings = LaneSettings(template.per_minute, config.remote, config.retry)
            if client.base_url != template.base_url:
                client = dataclasses.replace(client, base_url=template.base_url)
                daemon.accounts.clients[name] = client
                lane.configure(settings, daemon.lanes.sender(client))
            else:
                lane.configure(settings)
    removed = [
        name for name in lanes if name not in accounts and name not in daemon.accounts.clients
    ]
    for name in removed:
        log.warning(
            "account_removed",
            account=name,
            queued=daemon.queue.depth(name),
            action="delivers what it holds, then stops",
        )
        dispatcher.retire(name)
    return added, removed


def changed_keys(old: Config, new: Config) -> list[str]:
    """The `section.key` names whose values differ (accounts compared as whole tables)."""
    changed: list[str] = []
    for section in dataclasses.fields(old):
        before, after = getattr(old, section.name), getattr(new, section.name)
        if section.name == "accounts":
            changed += [
                f"accounts.{name}"
                for name in sorted({*before, *after})
                if before.get(name) != after.get(name)
            ]
            continue
        for item in dataclasses.fields(before):
            if getattr(before, item.name) != getattr(after, item.name):
                changed.append(f"{section.name}.{item.name}")
    return changed
