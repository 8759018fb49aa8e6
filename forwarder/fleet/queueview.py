"""What a fleet member shows of the shared queue: /v1/stats's `fleet.queue`, the
`forwarder_fleet_queue_*` metrics. Read from the log's parts, never from Redis on a scrape:
stream lengths and pending counts are the ones the ownership loop last read (`QueueTotals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forwarder.fleet.fallback import Fallback
from forwarder.fleet.ownership import Ownership
from forwarder.fleet.window import FleetWindow


@dataclass(slots=True)
class QueueTotals:
    """The shared queue's totals over this host's accounts, as last read from Redis."""

    length: int = 0  # entries in the streams (waiting or in delivery somewhere)
    pending: int = 0  # handed to a member, not settled
    dead_letters: int = 0  # in the accounts' dead-letter streams
    appended: int = 0  # events this host appended to the streams (intake and the mover)


def view(
    ownership: Ownership, window: FleetWindow, fallback: Fallback, totals: QueueTotals
) -> dict[str, Any]:
    """The `queue` object of /v1/stats's `fleet`."""
    c = window.counters
    return {
        "intake": "spool" if fallback.active else "redis",
        "partitions_held": len(ownership.held),
        "consumers": len(ownership.live),
        "draining": ownership.draining,
        "stream_length": totals.length,
        "pending": totals.pending,
        "dead_letters": totals.dead_letters,
        "spooled": fallback.spool.depth,
        "appended": totals.appended,
        "moved_from_spool": fallback.moved,
        "loaded": c.loaded,
        "claimed": c.claimed,
        "settled": c.settled,
        "stale_settles": c.stale_settles,
        "fenced": c.fenced,
        "leases_lost": ownership.lost_count,
    }


def gauges(
    ownership: Ownership, fallback: Fallback, totals: QueueTotals
) -> dict[str, tuple[str, float]]:
    """`forwarder_fleet_queue_*` gauges."""
    return {
        "fleet_queue_partitions_held": (
            "Partitions of the shared queue this host holds a lease on.",
            len(ownership.held),
        ),
        "fleet_queue_fallback": (
            "1 while intake writes to the local spool (Redis unreachable or catching up), else 0.",
            int(fallback.active),
        ),
        "fleet_queue_spooled": (
            "Events in the local spool waiting to be moved into Redis.",
            fallback.spool.depth,
        ),
        "fleet_queue_stream_length": (
            "Entries in this host's accounts' shared streams, as last read.",
            totals.length,
        ),
        "fleet_queue_pending": (
            "Entries handed to a member and not settled, as last read.",
            totals.pending,
        ),
        "fleet_queue_dead_letters": (
            "Dead letters in this host's accounts' dead-letter streams, as last read.",
            totals.dead_letters,
        ),
    }


def counters(
    ownership: Ownership, window: FleetWindow, fallback: Fallback, totals: QueueTotals
) -> dict[str, tuple[str, float]]:
    """`forwarder_fleet_queue_*` counters."""
    c = window.counters
    return {
        "fleet_queue_appended": (
            "Events this host appended to the shared streams.",
            totals.appended,
        ),
        "fleet_queue_moved": (
            "Events moved from the local spool into the shared streams.",
            fallback.moved,
        ),
        "fleet_queue_fallbacks": (
            "Times intake fell back to the local spool.",
            fallback.entered,
        ),
        "fleet_queue_claimed": (
            "Entries taken over from other members (XCLAIM).",
            c.claimed,
        ),
        "fleet_queue_settled": ("Entries acknowledged and deleted after their outcome.", c.settled),
        "fleet_queue_stale_settles": (
            "Settles refused because the partition's lease had moved on (fencing).",
            c.stale_settles,
        ),
        "fleet_queue_fenced": (
            "Events a lane gave back before an attempt: their partition's lease had moved on.",
            c.fenced,
        ),
        "fleet_queue_leases_lost": (
            "Partition leases this host lost (not renewed in time, or taken over).",
            ownership.lost_count,
        ),
    }
