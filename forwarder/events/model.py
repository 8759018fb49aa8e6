"""The `Event` an app's request becomes, the limits of its fields, and how a refusal is told.

An event's name is kept as one shared copy per name (`shared_name`): event names are a small
set repeated over every queued event.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MAX_ID_CHARS = 255
MAX_NAME_CHARS = 255
MAX_VALUE_CHARS = 1024
MAX_REF_CHARS = 255
MAX_DATA_BYTES = 64 * 1024
# `data` given as a JSON object or array may nest this deep, no deeper. Real templating data is a
# few levels deep; 64 stays far below what orjson serialises (255 levels), what PHP's json_decode
# reads by default (512, the remote's kind) and Python's recursion limit, so nothing past
# validation can fail on depth.
MAX_DATA_DEPTH = 64
EVENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{10,255}")
# Names of configured accounts ([accounts.NAME]); client-key accounts are "client:" + a digest.
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Event names are a small set (PURCHASE, PAGE_VIEW, ...) repeated over every queued event: each
# event keeps one shared copy of its name instead of its own (~60 bytes an event in memory). A
# bounded table of our own rather than sys.intern, which made strings immortal on some CPython
# 3.12 releases (python/cpython#113993): an app's every new name would never be freed. Past the
# bound, new names are just not shared.
_NAMES_MAX = 1024
shared_names: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of one event in a request."""

    index: int
    field: str
    message: str

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "field": self.field, "message": self.message}


class EventValidationError(Exception):
    """A request whose events are not all valid; carries every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = f"item {first.index}: " if first.index >= 0 else ""
        super().__init__(f"{where}{first.field}: {first.message}{more}")


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made building
# an Event cost about five times as much, and intake builds one per accepted event. Nothing
# changes an Event after validation; a changed copy is made with dataclasses.replace.
@dataclass(slots=True)
class Event:
    """An accepted recipient event. `event_id` is its idempotency key for every delivery attempt.

    Treat it as immutable: it is shared by the queue, the spool and the delivery lanes.
    """

    event_id: str
    recipient_id: str
    name: str
    value: str = ""
    conversion: bool = False
    data: str = ""
    ref: str = ""
    accepted_at: float = 0.0
    # The account it is delivered under; "" means the default account.
    account: str = ""
    # Its event number (storage/numbering.py), set once it is queued: in memory mode by intake, in
    # durable mode its spool position. 0: none. Not part of its value (equality, records).
    number: int = dataclasses.field(default=0, compare=False)

    def form(self) -> dict[str, str]:
        """The form fields sent to the remote; optional fields are left out when empty."""
        form = {
            "recipient_id": self.recipient_id,
            "name": self.name,
            "conversion": "1" if self.conversion else "0",
        }
        if self.value:
            form["value"] = self.value
        if self.data:
            form["data"] = self.data
        if self.ref:
            form["ref"] = self.ref
        return form

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record, used by the pending and dead-letter files."""
        return {
            "event_id": self.event_id,
            "recipient_id": self.recipient_id,
            "name": self.name,
            "value": self.value,
            "conversion": self.conversion,
            "data": self.data,
            "ref": self.ref,
            "accepted_at": self.accepted_at,
            "account": self.account,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Event:
        """Rebuild an event from `to_dict` output; raises ValueError if the record is damaged."""
        try:
            event = cls(
                event_id=str(raw["event_id"]),
                recipient_id=str(raw["recipient_id"]),
                name=shared_name(str(raw["name"])),
                value=str(raw.get("value", "")),
                conversion=bool(raw.get("conversion", False)),
                data=str(raw.get("data", "")),
                ref=str(raw.get("ref", "")),
                accepted_at=float(raw.get("accepted_at", 0.0)),
                account=str(raw.get("account", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an event record: {exc!r}") from None
        if not event.event_id or not event.recipient_id or not event.name:
            raise ValueError("not an event record: empty event_id, recipient_id or name")
        return event


def shared_name(name: str) -> str:
    """The one shared copy of an event name (see `shared_names`); `name` itself if it is new and the
    table is full."""
    shared = shared_names.get(name)
    if shared is None:
        shared = name
        if len(shared_names) < _NAMES_MAX and type(name) is str:  # never keep a str subclass
            shared_names[name] = name
    return shared
