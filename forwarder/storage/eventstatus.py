"""What became of an event: GET /v1/events/{id} and `forwarder events show`.

An event is `queued` (in the queue, or in the spool), `in_delivery` (attempted, or waiting to be
again), `delivered` or `dead_lettered`; unknown once its outcome is forgotten. The delivery lanes
tell the `StatusBook` of attempts and outcomes. Outcomes are kept `state.outcome_retention_s`
(the remote's idempotency window by default): in memory, at most `state.outcome_max_count` of
them (the oldest go first), and in durable mode also in the spool (sqlite/outcomes.py), written
by the transaction that settles the event. A purge pass every `PURGE_EVERY_S` deletes a bounded
number of expired ones.

In a fleet's shared queue another host may deliver what this one accepted: the fleet's log sets
`shared` (fleet/outcomes.py: outcomes in Redis, written when an entry is settled) and tells the
book of every event accepted here (`accepted`), so a look-up here finds an outcome written by
any host, and an event accepted here and not settled yet is `queued`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from forwarder.events import Event
from forwarder.events.model import EVENT_ID_RE
from forwarder.storage.sqlite import outcomes as outcomestore
from forwarder.storage.sqlite.outcomes import OutcomeRow

if TYPE_CHECKING:
    from forwarder.storage.queue import EventQueue
    from forwarder.storage.sqlite.spool import Spool

log = structlog.get_logger("forwarder.eventstatus")
PURGE_EVERY_S = 60.0
PURGE_LIMIT = 10_000  # outcomes deleted per pass at most: a short write lock


class StatusUnavailable(Exception):
    """The store that holds outcomes cannot answer now (Redis out): a 503, never a 404."""


class SharedOutcomes(Protocol):
    """Outcomes other hosts wrote (a fleet's shared queue: fleet/outcomes.py)."""

    async def find(self, event_id: str, account: str | None) -> OutcomeRow | None:
        """The outcome of `event_id` (in `account`, or in any when None); `StatusUnavailable`."""
        ...


class Progress(Protocol):
    """An event's delivery so far, as its lane keeps it."""

    attempts: int
    next_at: float | None  # time.time() of the next attempt; None while one is under way


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and one is made
# for every delivered event.
@dataclass(slots=True)
class Outcome:
    """A settled event: delivered (with the remote's id) or dead-lettered (with why)."""

    state: str  # "delivered" | "dead_lettered"
    event_id: str
    number: int
    account: str
    attempts: int
    at: float  # time.time() of the outcome
    remote_id: Any = None
    reason: str = ""
    status: int | None = None
    error: str = ""

    def row(self) -> OutcomeRow:
        """As a row of the spool's outcomes table."""
        remote_id = self.remote_id
        if remote_id is not None and not isinstance(remote_id, int | float | str):
            remote_id = str(remote_id)
        return (
            self.event_id,
            self.number or None,
            self.state,
            self.account,
            self.attempts,
            self.at,
            remote_id,
            self.reason,
            self.status,
            self.error,
        )

    @classmethod
    def from_row(cls, row: OutcomeRow) -> Outcome:
        """From a row of the spool's outcomes table."""
        event_id, number, state, account, attempts, at, remote_id, reason, status, error = row
        return cls(
            state, event_id, number or 0, account or "", attempts or 0, at, remote_id,
            reason or "", status, error or "",
        )  # fmt: skip

    def view(self) -> dict[str, Any]:
        """The JSON answer's `data`."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "number": self.number or None,
            "status": self.state,
            "account": self.account,
            "attempts": self.attempts,
        }
        if self.state == "delivered":
            out["remote_id"] = self.remote_id
            out["delivered_at"] = _iso(self.at)
        else:
            out["reason"] = self.reason
            out["remote_status"] = self.status
            out["error"] = self.error
            out["dead_lettered_at"] = _iso(self.at)
        return out


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def parse_key(text: str) -> str | int | None:
    """An event number (up to 16 digits) or an event_id; None when it can be neither.

    Digits are read as a number; `StatusBook.lookup_text` tries them as an event_id too (an
    app may choose an event_id of digits).
    """
    if text.isascii() and text.isdigit() and len(text) <= 16:
        return int(text)
    return text if EVENT_ID_RE.fullmatch(text) else None


class StatusBook:
    """The lanes' attempts and outcomes, and the look-up across queue, lanes and spool."""

    def __init__(
        self,
        *,
        retention_s: float,
        max_count: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.retention_s = retention_s
        self.max_count = max_count
        self._clock = clock
        self._delivering: dict[str, tuple[Event, Progress]] = {}
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._outcome_numbers: dict[int, str] = {}
        # An outcome on its way into the settling op (Backlog takes it), when the spool keeps them.
        self._unsaved: dict[str, OutcomeRow] = {}
        self.queue: EventQueue | None = None
        # The spool that keeps outcomes and is searched for queued events: set by the durable
        # backend only (memory mode's spool holds a stop's leftovers, not the backlog).
        self.spool: Spool | None = None
        # A fleet's outcomes in Redis, and the events accepted here: event_id → (number, account).
        self.shared: SharedOutcomes | None = None
        self._accepted: OrderedDict[str, tuple[int, str, float]] = OrderedDict()
        self._accepted_numbers: dict[int, str] = {}
        self.accepted_changes = 0  # how often `_accepted` changed (a saver writes it on change)
        self._purger: asyncio.Task[None] | None = None

    # --- told by the lanes --------------------------------------------------------------------

    def delivering(self, event: Event, progress: Progress) -> None:
        """A lane took `event`; `progress` is its tally of attempts, read on a look-up."""
        self._delivering[event.event_id] = (event, progress)

    def settled(self, event: Event, spool_seq: int, outcome: Outcome | None) -> None:
        """`event` left delivery; `outcome` is what became of it (None: nothing is kept)."""
        # Once per delivered event: one call, no helper calls on the common path.
        event_id = event.event_id
        self._delivering.pop(event_id, None)
        if outcome is None:
            return
        outcomes, key = self._outcomes, outcome.event_id
        if key in outcomes:  # settled before (an event_id sent again): it goes to the end
            old = outcomes.pop(key)
            if old.number:
                self._outcome_numbers.pop(old.number, None)
        outcomes[key] = outcome
        if outcome.number:
            self._outcome_numbers[outcome.number] = key
        while len(outcomes) > self.max_count:
            self._drop_oldest()
        if spool_seq and (self.spool is not None or self.shared is not None):
            self._unsaved[event_id] = outcome.row()

    def take_unsaved(self, event: Event) -> OutcomeRow | None:
        """The outcome row to store with `event`'s settling (durable mode, a fleet), once."""
        return self._unsaved.pop(event.event_id, None) if self._unsaved else None

    def _drop_oldest(self) -> None:
        _, gone = self._outcomes.popitem(last=False)
        if gone.number and self._outcome_numbers.get(gone.number) == gone.event_id:
            del self._outcome_numbers[gone.number]

    def accepted(self, events: list[Event]) -> None:
        """Events accepted here into a fleet's shared queue (their numbers are this host's):
        remembered, at most `max_count`, so a look-up here can answer for them."""
        if self.max_count <= 0:
            return
        accepted, numbers = self._accepted, self._accepted_numbers
        for event in events:
            accepted[event.event_id] = (event.number, event.account, event.accepted_at)
            if event.number:
                numbers[event.number] = event.event_id
        while len(accepted) > self.max_count:
            gone, (number, _, _) = accepted.popitem(last=False)
            if numbers.get(number) == gone:
                del numbers[number]
        self.accepted_changes += 1

    def accepted_rows(self) -> list[tuple[str, int, str, float]]:
        """The events accepted here, oldest first: (event_id, number, account, accepted_at)."""
        return [(event_id, *row) for event_id, row in self._accepted.items()]

    def restore_accepted(self, rows: list[tuple[str, int, str, float]]) -> int:
        """Remember again what `accepted_rows` gave before a restart, but what is older than
        the retention; returns how many."""
        if self.max_count <= 0:
            return 0
        cutoff = self._clock() - self.retention_s
        kept = [row for row in rows if row[3] >= cutoff][-self.max_count :]
        for event_id, number, account, at in kept:
            self._accepted[event_id] = (number, account, at)
            if number:
                self._accepted_numbers[number] = event_id
        return len(kept)

    @property
    def kept(self) -> int:
        """Outcomes held in memory."""
        return len(self._outcomes)

    # --- the look-up --------------------------------------------------------------------------

    async def lookup_text(self, text: str) -> dict[str, Any] | None:
        """`lookup` of what GET /v1/events/{id} was given (parse_key said it is valid)."""
        key = parse_key(text)
        if key is None:
            return None
        found = await self.lookup(key)
        if found is None and isinstance(key, int) and EVENT_ID_RE.fullmatch(text):
            found = await self.lookup(text)  # an event_id of digits
        return found

    async def lookup(self, key: str | int) -> dict[str, Any] | None:
        """What became of the event `key` (its number or its event_id); None: not known."""
        if not self._accepted:
            return await self._lookup(key)
        # A fleet's: an event read back from Redis has no number (it is the accepting host's),
        # so a number accepted here is looked up by its event_id and put back in the answer.
        if isinstance(key, int) and key in self._accepted_numbers:
            key = self._accepted_numbers[key]
        found = await self._lookup(key)
        if found is not None and found.get("number") is None:
            found["number"] = self._accepted.get(found["event_id"], (0, "", 0.0))[0] or None
        return found

    async def _lookup(self, key: str | int) -> dict[str, Any] | None:
        if (found := self._in_delivery(key)) is not None:
            return found
        outcome = self._remembered(key)
        if outcome is not None:
            return outcome.view()
        found = self._queued_in_memory(key)
        if found is not None:
            return found
        if self.shared is not None:
            return await self._from_fleet(key)
        if self.spool is None:
            return None
        return await self._from_spool(key)

    def _remembered(self, key: str | int) -> Outcome | None:
        event_id = self._outcome_numbers.get(key) if isinstance(key, int) else key
        outcome = self._outcomes.get(event_id) if event_id is not None else None
        if outcome is not None and outcome.at < self._clock() - self.retention_s:
            return None  # expired, not purged yet
        return outcome

    def _in_delivery(self, key: str | int) -> dict[str, Any] | None:
        if isinstance(key, str):
            found = self._delivering.get(key)
        else:  # events in delivery are few (the lanes' concurrency): a scan
            found = next((v for v in self._delivering.values() if v[0].number == key), None)
        if found is None:
            return None
        event, progress = found
        if not progress.attempts:
            return None  # taken by its lane, not attempted yet: still queued
        next_at = progress.next_at
        return {
            "event_id": event.event_id,
            "number": event.number or None,
            "status": "in_delivery",
            "account": event.account,
            "attempts": progress.attempts,
            "next_attempt_at": None if next_at is None else _iso(next_at),
        }

    def _queued_in_memory(self, key: str | int) -> dict[str, Any] | None:
        if self.queue is None:
            return None
        event = self.queue.find(key)
        return None if event is None else _queued(event.event_id, event.number, event.account)

    async def _from_fleet(self, key: str | int) -> dict[str, Any] | None:
        """A fleet's: the outcome any host wrote, else `queued` if it was accepted here."""
        assert self.shared is not None
        if isinstance(key, int):
            return None  # numbers are this host's: one accepted here was made an event_id
        number, account, _ = self._accepted.get(key, (0, None, 0.0))
        row = await self.shared.find(key, account)
        if row is not None:
            outcome = Outcome.from_row(row)
            return None if outcome.at < self._clock() - self.retention_s else outcome.view()
        return None if account is None else _queued(key, number, account)

    async def _from_spool(self, key: str | int) -> dict[str, Any] | None:
        assert self.spool is not None
        if isinstance(key, int):
            row = await self.spool.query(outcomestore.outcome_by_number, key)
        else:
            row = await self.spool.query(outcomestore.outcome_by_id, key)
        if row is not None:
            outcome = Outcome.from_row(row)
            return None if outcome.at < self._clock() - self.retention_s else outcome.view()
        if isinstance(key, int):
            event_id = await self.spool.query(outcomestore.queued_by_number, key)
            return None if event_id is None else _queued(event_id, key, None)
        number = await self.spool.query(outcomestore.queued_by_id, key)
        return None if number is None else _queued(key, number, None)

    # --- forgetting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic purge of expired outcomes."""
        self._purger = asyncio.create_task(self._purge_loop(), name="outcome-purge")

    async def stop(self) -> None:
        """Stop the purge."""
        if self._purger is not None:
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None

    def purge_memory(self, limit: int = PURGE_LIMIT) -> int:
        """Forget at most `limit` expired outcomes held in memory (the oldest are first)."""
        before = self._clock() - self.retention_s
        count = 0
        while self._outcomes and count < limit:
            oldest = next(iter(self._outcomes.values()))
            if oldest.at >= before:
                break
            self._drop_oldest()
            count += 1
        return count

    async def purge(self) -> int:
        """One pass: expired outcomes out of memory and (durable mode) out of the spool."""
        count = self.purge_memory()
        if self.spool is not None:
            count += await self.spool.query(
                outcomestore.purge, self._clock() - self.retention_s, PURGE_LIMIT
            )
        return count

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            try:
                purged = await self.purge()
            except Exception as exc:  # a failing disk: logged, tried again next pass
                log.error("outcome_purge_failed", error=str(exc))
                continue
            if purged:
                log.debug("outcomes_purged", count=purged)


def _queued(event_id: str, number: int, account: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"event_id": event_id, "number": number or None, "status": "queued"}
    if account is not None:
        out["account"] = account
    return out
