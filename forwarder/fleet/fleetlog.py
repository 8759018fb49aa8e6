"""The fleet backend of the event log (`queue.mode = "fleet"`): Redis streams shared by the fleet.

- `append` (intake): the request's events are added to their partitions' streams in one
  transaction and intake answers once Redis acknowledged it; when Redis does not answer in time
  they are committed to the local spool instead (fallback.py) and moved into Redis later.
- The window (window.py): events of the partitions this member holds (ownership.py, leases.py)
  loaded into the lanes' queue in stream order; the lanes' outcomes settled in Redis, fenced.
- At a stop: the leases are released and the unsettled entries handed to the next holder;
  nothing is written locally (every accepted event is in Redis or in the local spool).

Dead letters go to the account's `dead` stream (`forwarder dlq` reads them there in fleet
mode). Outcomes for GET /v1/events/{id} are kept in memory, as in memory mode.

One module although just past 400 lines: the `EventLog` methods, the three loops that drive
ownership, the window's fill and its settles, and the opener that builds them; every part with
state of its own already lives beside it (window.py, ownership.py, fallback.py, streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from forwarder.config.schema import Config, ConfigError
from forwarder.delivery.deadletter import DeadLetterNote
from forwarder.events import Event
from forwarder.fleet import accepted, queuestatus, queueview
from forwarder.fleet.accepted import AcceptedSaver
from forwarder.fleet.fallback import Fallback
from forwarder.fleet.host import member_name, open_client
from forwarder.fleet.leases import Leases
from forwarder.fleet.outcomes import FleetOutcomes, encode_row
from forwarder.fleet.ownership import Ownership
from forwarder.fleet.partition import partition_of
from forwarder.fleet.queueview import QueueTotals
from forwarder.fleet.streams import Streams, encode_event
from forwarder.fleet.window import FleetWindow
from forwarder.storage import spooled
from forwarder.storage.eventstatus import StatusBook
from forwarder.storage.log import EventLog, LogDeps, LogError, Stored
from forwarder.storage.numbering import EventNumbers
from forwarder.storage.queue import EventQueue
from forwarder.storage.sqlite.spool import Spool

log = structlog.get_logger("forwarder.fleet")

# An append Redis has not acknowledged within this goes to the local spool instead.
APPEND_TIMEOUT_S = 2.0
# Every other Redis round of the loops is bounded by this.
CALL_TIMEOUT_S = 5.0
# An idle window looks for new entries this often (appends on this host wake it at once).
POLL_S = 0.05
# The stream lengths and pending counts shown are read this often.
TOTALS_S = 5.0
# Settles wait this long for company before they are sent (one script call for many).
FLUSH_S = 0.005


class FleetLog:
    """The `EventLog` of queue.mode "fleet" (see the module docstring)."""

    overflow_waits = False
    restored = 0

    def __init__(
        self,
        config: Config,
        deps: LogDeps,
        redis: Any,
        numbers: EventNumbers,
        status: StatusBook,
        spool: Spool,
        close_redis: Callable[[], Awaitable[None]] | None = None,
        saver: AcceptedSaver | None = None,
    ) -> None:
        fleet = config.fleet
        self.member = member_name(config)
        self._config = config
        self._deps = deps
        self._redis = redis
        self._close_redis = close_redis
        self._numbers = numbers
        self._status = status
        # Saves the numbers answered here, so they are found after a restart (accepted.py).
        self._saver = saver
        self._partitions = fleet.partitions
        self.streams = Streams(redis, prefix=fleet.key_prefix, member=self.member, keep=status)
        leases = Leases(redis, prefix=fleet.key_prefix, member=self.member, lease_s=fleet.lease_s)
        claim_idle_ms = int(fleet.claim_idle_s * 1000)
        self.window = FleetWindow(
            self.streams, deps.queue, claim_idle_ms=claim_idle_ms, valid=leases.valid
        )
        self.ownership = Ownership(
            redis,
            leases,
            prefix=fleet.key_prefix,
            partitions=fleet.partitions,
            claim_idle_ms=claim_idle_ms,
            accounts=config.account_names,
            in_flight=self.window.in_flight,
            gained=self.window.gained,
            lost=self.window.stopped,
        )
        self.fallback = Fallback(spool, self._to_redis)
        self.kept_out: Callable[[str], bool] = _never
        self._tasks: list[asyncio.Task[None]] = []
        self._fill_wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._own_wake = asyncio.Event()  # a reload's new lease_s: renew at once
        self.redis_errors = 0
        self.totals = QueueTotals()
        self._loading = True  # False once the daemon stops: the drain takes nothing new

    @property
    def queue(self) -> EventQueue:
        """The window the lanes read from."""
        return self._deps.queue

    @property
    def status(self) -> StatusBook:
        """What became of events, kept in memory."""
        return self._status

    @property
    def numbers(self) -> EventNumbers:
        """The counter intake takes numbers from."""
        return self._numbers

    @property
    def intake_numbers(self) -> EventNumbers:
        """Intake numbers each event as it parses it."""
        return self._numbers

    # -- intake -------------------------------------------------------------------------------

    def try_append(self, events: list[Event]) -> str | None:
        """Never at once: Redis (or the spool) must acknowledge first."""
        return None

    async def append(self, events: list[Event]) -> str:
        """Into Redis (or, Redis unreachable, the local spool): "" or why not."""
        if not events:
            return ""
        if self.fallback.active:
            refused = await self.fallback.append(events, "earlier events still in the local spool")
            return self._accepted(events, refused)
        try:
            async with asyncio.timeout(APPEND_TIMEOUT_S):
                await self._to_redis(events)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis away, frozen or refusing: the spool takes them
            self.redis_errors += 1
            return self._accepted(
                events, await self.fallback.append(events, f"redis append: {type(exc).__name__}")
            )
        self._fill_wake.set()
        return self._accepted(events, "")

    def _accepted(self, events: list[Event], refused: str) -> str:
        """Tell the status book of events accepted here (another host may deliver them)."""
        if not refused:
            self._status.accepted(events)
        return refused

    async def _to_redis(self, events: list[Event]) -> None:
        by_account: dict[str, list[tuple[int, bytes]]] = {}
        for event in events:
            entry = (partition_of(event.recipient_id, self._partitions), encode_event(event))
            by_account.setdefault(event.account, []).append(entry)
        for account, entries in by_account.items():
            await self.streams.append(account, entries)
            self.totals.appended += len(entries)

    # -- delivery -----------------------------------------------------------------------------

    def delivered(self, event: Event, spool_seq: int) -> None:
        """Settle a delivered event's entry (batched, fenced), keeping its outcome."""
        self.window.settle(spool_seq, self._outcome(event))
        self._flush_wake.set()
        self._fill_wake.set()  # its partition has room for one more

    def dead_lettered(self, event: Event, spool_seq: int, note: DeadLetterNote) -> None:
        """Move a failed event's entry to the account's dead letters (fenced)."""
        self.window.dead_letter(spool_seq, event, note, self._outcome(event))
        self._flush_wake.set()
        self._fill_wake.set()

    def _outcome(self, event: Event) -> tuple[str, bytes] | None:
        """The outcome the lane told the status book, as the settle script keeps it."""
        row = self._status.take_unsaved(event)
        return None if row is None else (event.event_id, encode_row(row))

    def may_deliver(self, event: Event) -> bool:
        """Before each attempt (the lanes' `Fence`): the event's partition is still held here
        under the lease it was read with; else the lane drops it and its holder delivers it."""
        return self.window.may_deliver(event)

    def wake(self) -> None:
        """Room was made in the window: load more."""
        self._fill_wake.set()

    # -- the view -----------------------------------------------------------------------------

    @property
    def on_disk_only(self) -> int:
        """Events in the local spool waiting for Redis."""
        return self.fallback.spool.depth

    def stored(self) -> Stored:
        """The local spool's counters (events waiting for Redis)."""
        spool = self.fallback.spool
        return Stored(
            spool.depth,
            spool.bytes,
            spool.oldest_accepted_at,
            spool.dead_letters,
            spool.depth,
            self.fallback.moved,
        )

    def set_group_commit(self, window_s: float) -> None:
        """The local spool's group commit."""
        self.fallback.spool.group_window_s = window_s

    def stop_loading(self) -> None:
        """The daemon is stopping: the drain delivers what is in the window, nothing new."""
        self._loading = self.window.loading = False

    def set_lease_s(self, lease_s: float) -> None:
        """A reload's `fleet.lease_s`: the next ownership round, at once, renews the held
        leases for it (and beats every lease_s / 3 from then on)."""
        self.ownership.leases.set_lease_s(lease_s)
        self._own_wake.set()

    def set_claim_idle_s(self, claim_idle_s: float) -> None:
        """A reload's `fleet.claim_idle_s`: partitions acquired from then on wait it before
        claiming what a holder that did not release them left (one waiting keeps its deadline,
        which was safe: it exceeded the same remote.timeout_s)."""
        self.window.claim_idle_ms = self.ownership.claim_idle_ms = int(claim_idle_s * 1000)

    def queue_view(self) -> dict[str, Any]:
        """The `queue` object of /v1/stats's `fleet`."""
        return queueview.view(self.ownership, self.window, self.fallback, self.totals)

    def queue_gauges(self) -> dict[str, tuple[str, float]]:
        """`forwarder_fleet_queue_*` gauges."""
        return queueview.gauges(self.ownership, self.fallback, self.totals)

    def queue_counters(self) -> dict[str, tuple[str, float]]:
        """`forwarder_fleet_queue_*` counters."""
        return queueview.counters(self.ownership, self.window, self.fallback, self.totals)

    # -- the lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start owning partitions, filling the window, flushing outcomes, moving the spool."""
        self._status.start()
        if self._saver is not None:
            self._saver.start()
        self.fallback.start()
        self._tasks = [
            asyncio.create_task(self._own_loop(), name="fleet-ownership"),
            asyncio.create_task(self._fill_loop(), name="fleet-fill"),
            asyncio.create_task(self._flush_loop(), name="fleet-flush"),
        ]

    async def stop(self) -> None:
        """Stop loading and owning (the lanes stop next; `release` gives the leases up)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.fallback.stop()
        await self._status.stop()
        if self._saver is not None:
            await self._saver.stop()

    async def release(self, leftovers: list[tuple[Event, int]]) -> int:
        """Write the outcomes still unsent and give the leases up; the events left in the
        window stay pending in Redis for the next holder. Returns 0: nothing is written here."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self.window.flush()
                await self.ownership.release_all()
        except Exception as exc:  # Redis away: the leases run out, the next holder claims
            log.warning(
                "fleet_release_failed",
                error=type(exc).__name__,
                unflushed=self.window.unflushed,
                action="the leases run out and the next holders deliver what was not settled",
            )
        return 0

    async def close(self) -> None:
        """Close the local spool and the Redis client (if this log opened it)."""
        await self.fallback.spool.close()
        if self._close_redis is not None:
            close, self._close_redis = self._close_redis, None
            await close()

    # -- loops ----------------------------------------------------------------------------------

    async def _own_loop(self) -> None:
        next_totals = 0.0
        loop = asyncio.get_running_loop()
        while True:
            _raise_if_cancelled()
            period = self.ownership.leases.lease_s / 3  # a reload may change it
            self._own_wake.clear()
            try:
                async with asyncio.timeout(min(CALL_TIMEOUT_S, period * 2)):
                    await self.ownership.tick()
                if loop.time() >= next_totals:
                    next_totals = loop.time() + TOTALS_S
                    async with asyncio.timeout(CALL_TIMEOUT_S):
                        await self._read_totals()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._redis_failed("ownership", exc)
            self._fill_wake.set()
            await _wait(self._own_wake, period)

    async def _read_totals(self) -> None:
        """Stream lengths, pending counts and dead letters of this host's accounts."""
        length = pending = dead = 0
        for account in self._config.account_names():
            status = await queuestatus.account_queue(
                self._redis, self.streams.prefix, account, self._partitions
            )
            length, pending = length + status.length, pending + status.pending
            dead += status.dead_letters
        totals = self.totals
        totals.length, totals.pending, totals.dead_letters = length, pending, dead

    async def _fill_loop(self) -> None:
        while True:
            _raise_if_cancelled()
            self.ownership.check_expired()
            loaded = 0
            if not self._loading:
                await asyncio.sleep(POLL_S)
                continue
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    loaded = await self.window.fill()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._redis_failed("read", exc)
                await asyncio.sleep(POLL_S * 4)
            if not loaded:
                self._fill_wake.clear()
                await _wait(self._fill_wake, POLL_S)

    async def _flush_loop(self) -> None:
        while True:
            _raise_if_cancelled()
            await self._flush_wake.wait()
            await asyncio.sleep(FLUSH_S)
            self._flush_wake.clear()
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await self.window.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._redis_failed("settle", exc)
                self._flush_wake.set()
                await asyncio.sleep(POLL_S * 4)

    def _redis_failed(self, what: str, exc: BaseException) -> None:
        self.redis_errors += 1
        self._deps.throttle.log(
            log, "warning", "fleet_redis_failed", what, operation=what, error=type(exc).__name__
        )


def _never(account: str) -> bool:
    return False


def _raise_if_cancelled() -> None:
    """Python 3.11's asyncio.timeout can turn a cancellation that races its expiry into a
    TimeoutError; a loop that goes on after one must still stop when it was cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event`, at most `timeout` seconds; a cancellation is never swallowed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    _raise_if_cancelled()


async def open_log(config: Config, deps: LogDeps) -> EventLog:
    """The daemon's Redis client (or one of its own), the local spool for the fallback, the
    numbers and the outcomes. No Redis I/O: Redis down at start is a fallback, not an error."""
    redis, close_redis = await _client(config, deps)
    try:
        spool = await spooled.open_spool(config, deps.on_commit)
    except BaseException:
        if close_redis is not None:
            await close_redis()
        raise
    try:
        numbers = await spooled.open_numbers(config, spool)
        await spooled.lift_seq(config, spool, numbers.ceiling)
    except BaseException:
        await spool.close()
        if close_redis is not None:
            await close_redis()
        raise
    status = StatusBook(
        retention_s=config.state.outcome_retention_s, max_count=config.state.outcome_max_count
    )
    status.queue = deps.queue
    status.shared = FleetOutcomes(redis, config.fleet.key_prefix, config.account_names)
    saver = AcceptedSaver(status, config.state.path / accepted.FILE_NAME)
    status.restore_accepted(await asyncio.to_thread(accepted.load, saver.path))
    if spool.depth:
        log.info("fleet_spool_found", count=spool.depth, action="moved into Redis first")
    shared = FleetLog(config, deps, redis, numbers, status, spool, close_redis, saver)
    if deps.fleet is not None:
        deps.fleet.attach_queue(shared)  # /v1/stats, the metrics and the stop show and reach it
    return shared


async def _client(
    config: Config, deps: LogDeps
) -> tuple[Any, Callable[[], Awaitable[None]] | None]:
    """The raw redis-py client to use, and how to close it if this log opened it."""
    if deps.fleet is not None:
        return deps.fleet.client.client, None
    try:
        fleet, _ = await open_client(config)
    except ConfigError as exc:
        raise LogError(str(exc)) from None
    return fleet.client, fleet.aclose
