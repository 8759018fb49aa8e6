"""Which partition of an account's stream a recipient's events go to.

A stable hash (CRC-32 of the UTF-8 bytes), the same on every host, Python version and run:
Python's `hash()` of a string is salted per process, so two hosts would disagree. A recipient
always maps to one partition, which is what keeps its events in order across the fleet.
"""

from __future__ import annotations

import zlib


def partition_of(recipient_id: str, partitions: int) -> int:
    """The partition (0 ≤ N < `partitions`) of `recipient_id`."""
    # surrogatepass: intake rejects lone surrogates, but a hash must never raise.
    return zlib.crc32(recipient_id.encode("utf-8", "surrogatepass")) % partitions
