"""Dead letters of the shared queue: the account's `{P:A}:dead` stream, for `forwarder dlq`.

A dead letter is one stream entry (fields written by window.py: the event as JSON, reason,
status, error, attempts, times, the member). Its id is "ACCOUNT/ENTRY-ID". A replay puts the
event back into its partition's stream under the same event_id (the remote answers 409 if it
had created it after all) and deletes the dead letter, both in one script (`REPLAY`, one slot:
it runs on a cluster too), and only if the letter is still there, so two replays of one letter
put it back once; a purge
trims the dead letters older than a moment (`XTRIM MINID`: entry ids are Redis's clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from forwarder.events import Event
from forwarder.fleet.partition import partition_of
from forwarder.fleet.queuekeys import AccountKeys
from forwarder.fleet.streams import FIELD, encode_event

# KEYS: partition stream, dead letters. ARGV: field, event, letter id. → 1 put back, 0 gone.
REPLAY = """
if redis.call('XDEL', KEYS[2], ARGV[3]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class FleetDeadLetter:
    """One dead letter in Redis."""

    id: str  # "ACCOUNT/ENTRY-ID"
    event: Event | None  # None: the entry's event is not readable
    fields: dict[str, str]

    @property
    def dead_lettered_at(self) -> float:
        """When, on the member's clock (the entry id holds Redis's)."""
        try:
            return float(self.fields.get("dead_lettered_at", "0"))
        except ValueError:
            return 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the keys of the spool's dead letters, plus the source."""
        status = self.fields.get("status", "")
        return {
            "id": self.id,
            "source": "redis",
            "event": self.event.to_dict() if self.event is not None else None,
            "reason": self.fields.get("reason", ""),
            "status": int(status) if status.isdigit() else None,
            "error": self.fields.get("error", ""),
            "attempts": int(self.fields.get("attempts", "0") or 0),
            "first_attempt_at": _float(self.fields.get("first_attempt_at")),
            "last_attempt_at": _float(self.fields.get("last_attempt_at")),
            "dead_lettered_at": self.dead_lettered_at,
            "member": self.fields.get("member", ""),
        }


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _letter(account: str, entry_id: Any, raw: dict[Any, Any] | None) -> FleetDeadLetter:
    fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
    event: Event | None = None
    try:
        event = Event.from_dict(orjson.loads(fields.get("event", "")))
    except (ValueError, orjson.JSONDecodeError, TypeError, AttributeError):
        event = None
    return FleetDeadLetter(f"{account}/{_text(entry_id)}", event, fields)


def split_id(text: str) -> tuple[str, str]:
    """("ACCOUNT", "ENTRY-ID") of a dead letter's id; ValueError if it is not one."""
    account, sep, entry_id = text.rpartition("/")
    if not sep or not account or not entry_id:
        raise ValueError(f"{text!r} is not a fleet dead letter's id (ACCOUNT/ENTRY-ID)")
    return account, entry_id


async def list_letters(
    redis: Any, prefix: str, accounts: list[str], *, limit: int | None = None
) -> list[FleetDeadLetter]:
    """The dead letters of `accounts`, oldest first per account."""
    letters: list[FleetDeadLetter] = []
    for account in accounts:
        rows = await redis.xrange(AccountKeys(prefix, account).dead, count=limit)
        letters += [_letter(account, entry_id, raw) for entry_id, raw in rows or ()]
    return letters[:limit] if limit is not None else letters


async def get_letter(redis: Any, prefix: str, letter_id: str) -> FleetDeadLetter | None:
    """One dead letter by id, or None."""
    account, entry_id = split_id(letter_id)
    rows = await redis.xrange(AccountKeys(prefix, account).dead, entry_id, entry_id)
    return _letter(account, entry_id, rows[0][1]) if rows else None


async def replay(redis: Any, prefix: str, partitions: int, letter: FleetDeadLetter) -> bool:
    """Put the letter's event back into its partition's stream and delete the letter; False if
    it has no readable event or is gone already (another replay or a purge took it)."""
    if letter.event is None:
        return False
    account, entry_id = split_id(letter.id)
    keys = AccountKeys(prefix, account)
    event = letter.event
    stream = keys.stream(partition_of(event.recipient_id, partitions))
    done = await redis.eval(REPLAY, 2, stream, keys.dead, FIELD, encode_event(event), entry_id)
    return int(done) == 1


async def purge(redis: Any, prefix: str, accounts: list[str], before: float) -> int:
    """Delete the dead letters from before `before` (UNIX time); returns how many."""
    removed = 0
    for account in accounts:
        removed += int(
            await redis.xtrim(
                AccountKeys(prefix, account).dead, minid=int(before * 1000), approximate=False
            )
        )
    return removed
