"""Dead letters: what is recorded about an event the remote refused for good or ran out of time.

The records live in the spool database (`state.dir/spool.db`, table `dead_letters`), written in
the spool's group commit together with the removal of the event's row, so an event is never in
both places. `forwarder dlq` lists, shows, replays and purges them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from forwarder.events import Event

# Why an event was dead-lettered (`redirected`: the remote answered 3xx, see remote.py;
# `damaged`: a spool row that no longer parses as an event; `held_without_account`: its account
# had no lane past queue.held_max_age_s or queue.held_max_events, see storage/held.py).
REASONS = (
    "rejected", "redirected", "gave_up", "internal_error", "damaged", "held_without_account",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetterNote:
    """Why and after what an event was given up on."""

    reason: str
    status: int | None
    error: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float

    def fields(self) -> dict[str, Any]:
        """The note as keyword arguments (the spool's dead-letter columns)."""
        return {
            "reason": self.reason,
            "status": self.status,
            "error": self.error,
            "attempts": self.attempts,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
        }

    def record(self, event: Event) -> dict[str, Any]:
        """A JSON-ready record of the event and the note."""
        return {"event": event.to_dict(), **self.fields(), "dead_lettered_at": time.time()}
