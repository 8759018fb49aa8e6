"""What the running daemon shows: `/stats`, the Prometheus gauges and counters, `STATUS=`.

Read-only: every number is read from the components when asked, nothing here is kept in step,
but for one: the queue's oldest acceptance stamp, a walk over every recipient, is taken at most
once per `OLDEST_WALK_S` (a scrape or a `/v1/stats` poll must not cost delivery its CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forwarder.intake.accounts import CLIENT_IDLE_S, MAX_CLIENT_KEYS
from forwarder.ops.systemd import PerMinute, format_status, watchdog_interval

if TYPE_CHECKING:
    from forwarder.daemon.lifecycle import Daemon

# The queue's oldest stamp is walked for at most once this often: with 20 000 recipients queued
# a walk takes milliseconds, and monitoring polling a few times a second made it a tenth of the
# daemon's delivery CPU. The age may lag by this much; it is a gauge for minutes-long trouble.
OLDEST_WALK_S = 1.0


class StatusView:
    """The daemon's state rendered for `/stats`, `/metrics`, `/readyz` and systemd."""

    def __init__(self, daemon: Daemon, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._d = daemon
        self._delivery_rate = PerMinute()
        self._clock = clock
        self._oldest_walked_at = -OLDEST_WALK_S
        self._oldest_in_queue: float | None = None

    def not_ready_reason(self) -> str:
        """Why /readyz answers 503 ("" when ready)."""
        d = self._d
        if d.shutting_down:
            return "shutting down"
        if not d.ready.is_set():
            return "starting"
        if d._dispatcher is not None:
            return d._dispatcher.not_ready_reason()
        return ""

    def gauges(self) -> dict[str, tuple[str, float]]:
        """The gauges exported as `forwarder_NAME`: (help, value) by name."""
        d = self._d
        queue = d.queue
        dispatcher = d._dispatcher
        paused = bool(dispatcher and any(lane.auth.is_open for lane in dispatcher.lanes.values()))
        return {
            "queue_depth": ("Events waiting in the queue.", len(queue)),
            "queue_capacity": ("queue.max_events.", queue.max_events),
            "queue_bytes": (
                "Estimated bytes of the events in memory (waiting and in delivery).",
                queue.bytes,
            ),
            "queue_bytes_capacity": ("queue.max_bytes.", queue.max_bytes),
            "in_flight": ("Events in delivery.", queue.in_delivery),
            "delivery_paused": ("1 while the remote refuses a key.", int(paused)),
            "ready": ("1 when /readyz answers 200.", int(not self.not_ready_reason())),
            "backlog_events": (
                "Events accepted and not settled yet: waiting, in delivery or spooled.",
                self.backlog_events(),
            ),
            "oldest_event_age_seconds": (
                "Age of the oldest event not settled yet, in memory or in the spool (0: none).",
                self.oldest_age_s(),
            ),
            "config_reloads": ("Configuration reloads applied.", d.reloads),
            "connections_open": ("Intake connections open now.", d.connections.open),
            "connections_max": ("intake.max_connections.", d.connections.max_connections),
            "client_accounts": (
                "Client-key accounts open now (intake.accept_client_keys).",
                len(d.accounts.clients),
            ),
            **self.spool_gauges(),
            **(d.fleet.gauges() if d.fleet else {}),
        }

    def not_ready_conditions(self) -> dict[str, bool]:
        """Why /readyz says 503, as a fixed set of conditions (labels of forwarder_not_ready)."""
        d = self._d
        lanes = list(d._dispatcher.lanes.values()) if d._dispatcher else []
        return {
            "starting": not d.ready.is_set() and not d.shutting_down,
            "shutting_down": d.shutting_down,
            "breaker_open": any(lane.breaker.is_open and not lane.retired for lane in lanes),
            "key_refused": any(lane.auth.is_open and not lane.retired for lane in lanes),
        }

    def backlog_events(self) -> int:
        """Events accepted and not settled yet."""
        # A log that stores every unsettled event (durable) holds them all, the queue being a
        # window over it; otherwise the queue holds them all and the store none until a stop.
        d = self._d
        in_memory = len(d.queue) + d.queue.in_delivery
        return max(in_memory, d.log.stored().events if d.log else 0)

    def oldest_age_s(self) -> float:
        """Age of the oldest event not settled yet (0: none)."""
        d = self._d
        now = self._clock()
        if now - self._oldest_walked_at >= OLDEST_WALK_S:
            self._oldest_in_queue = d.queue.oldest_accepted_at()
            self._oldest_walked_at = now
        stamps = [self._oldest_in_queue]
        if d.log is not None:
            stamps.append(d.log.stored().oldest_accepted_at)
        oldest = min((t for t in stamps if t), default=None)
        return max(0.0, time.time() - oldest) if oldest else 0.0

    def counters(self) -> dict[str, tuple[str, float]]:
        """The counters kept outside `Stats`: (help, value) by name."""
        d = self._d
        guard = d.connections
        return {
            "connections_refused": (
                "Intake connections past intake.max_connections, answered 503 and closed.",
                guard.refused,
            ),
            "connections_header_timeouts": (
                "Intake connections closed: a request head not in within intake.header_timeout_s.",
                guard.header_timeouts,
            ),
            "client_accounts_refused": (
                "Drop-in requests refused (503) because every client-account slot was taken.",
                d.accounts.refused_at_cap,
            ),
            "client_accounts_freed": (
                "Client accounts freed after being idle.",
                d.accounts.freed,
            ),
            "connections_write_timeouts": (
                "Intake connections closed: an answer waited on an unread socket past "
                "intake.write_timeout_s.",
                guard.write_timeouts,
            ),
            **(d.fleet.counters() if d.fleet else {}),
        }

    def spool_gauges(self) -> dict[str, tuple[str, float]]:
        """The spool's gauges, from what the event log stores (none before it is open)."""
        d = self._d
        if d.log is None:
            return {}
        stored = d.log.stored()
        oldest = stored.oldest_accepted_at
        return {
            "spool_events": ("Events in the spool (state.dir/spool.db).", stored.events),
            "spool_bytes": ("Bytes of events in the spool.", stored.bytes),
            "spool_bytes_capacity": (
                "queue.max_disk_bytes (0: no bound).",
                d.config.queue.max_disk_bytes,
            ),
            "spool_oldest_event_age_seconds": (
                "Age of the oldest event in the spool (0 when empty).",
                max(0.0, time.time() - oldest) if oldest else 0.0,
            ),
            "spool_dead_letters": ("Dead letters kept in the spool.", stored.dead_letters),
            "spool_on_disk_only": (
                "Spooled events not in memory yet (durable mode's backlog).",
                stored.on_disk_only,
            ),
            "spool_replayed_events": (
                "Events brought back from the spool into memory since start.",
                stored.replayed,
            ),
        }

    def account_views(self) -> dict[str, dict[str, Any]]:
        """Each lane's view by account."""
        dispatcher = self._d._dispatcher
        return {name: lane.view() for name, lane in dispatcher.lanes.items()} if dispatcher else {}

    def stats_extra(self) -> dict[str, Any]:
        """What `/stats` shows besides the counters."""
        d = self._d
        queue, dispatcher = d.queue, d._dispatcher
        held = {
            name: queue.depth(name)
            for name in queue.accounts()
            if dispatcher is None or name not in dispatcher.lanes
        }
        for name, count in (d.held.view() if d.held else {}).items():
            held[name] = held.get(name, 0) + count
        return {
            "in_flight": queue.in_delivery,
            "delivery": {
                "ready": not self.not_ready_reason(),
                "reason": self.not_ready_reason(),
                "default_account": d.accounts.default,
                "per_recipient_order": queue.ordered,
                "config_reloads": d.reloads,
            },
            "accounts": self.account_views(),
            "backlog_events": self.backlog_events(),
            "oldest_event_age_s": round(self.oldest_age_s(), 3),
            "not_ready": [name for name, on in self.not_ready_conditions().items() if on],
            "last_error": d.stats.last_error,
            "connections": d.connections.view(),
            "client_accounts": {
                "open": len(d.accounts.clients),
                "max": MAX_CLIENT_KEYS,
                "idle_s": CLIENT_IDLE_S,
                "refused": d.accounts.refused_at_cap,
                "freed": d.accounts.freed,
            },
            # Events of accounts that have no lane now: a removed account, or a client key
            # not presented since a restart. Held apart from the queue's bound, saved at a stop,
            # and dead-lettered past queue.held_max_events / queue.held_max_age_s (held.py).
            "held_without_account": {k: v for k, v in held.items() if v},
            "spool": {
                "mode": d.config.queue.mode,
                **{name: value for name, (_, value) in self.spool_gauges().items()},
            },
            **({"fleet": d.fleet.view()} if d.fleet else {}),
        }

    def ready_detail(self) -> dict[str, Any]:
        """What /readyz adds to its answer: the fleet mode (a host in fallback is ready)."""
        fleet = self._d.fleet
        if fleet is None:
            return {}
        return {"fleet": {"mode": fleet.mode.name, "live_members": fleet.mode.live_members}}

    def status_line(self, prefix: str = "") -> str:
        """systemd's STATUS= line."""
        d = self._d
        return (
            prefix
            + format_status(
                queued=len(d.queue) + (d.log.on_disk_only if d.log else 0),
                in_delivery=d.queue.in_delivery,
                delivered_per_min=self._delivery_rate.observe(d.stats.delivered),
                spool=d.log.stored().events if d.log else 0,
            )
            + (f", {d.fleet.mode.name} mode ({d.fleet.mode.live_members} live)" if d.fleet else "")
        )

    def started(self, restored: int) -> dict[str, Any]:
        """The `started` line's fields."""
        d = self._d
        cfg = d.config
        return dict(
            listening=d.addresses,
            accounts={
                name: {"base_url": a.base_url, "api_key_source": a.key_source}
                for name, a in d.accounts.configured.items()
            },
            default_account=cfg.remote.default_account,
            queue_mode=cfg.queue.mode,
            concurrency=cfg.remote.concurrency or "adaptive",
            queue_max_events=cfg.queue.max_events,
            queue_max_bytes=cfg.queue.max_bytes,
            pending_restored=restored,
            spool_events=d.log.stored().events if d.log else 0,
            socket_activated=bool(d.activated),
            intake_token=d.intake_token.source if d.intake_token else "not required",
            watchdog_s=watchdog_interval(),
        )
