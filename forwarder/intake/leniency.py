"""What the drop-in endpoint takes as the remote would: counted by name, logged once per name.

The remote ignores form fields it does not know and takes any text as a conversion's value; the
drop-in endpoint does the same (POST /v1/events stays strict). Each ignored field is counted by
name in `forwarder_unknown_fields_total{field=...}`. Field names come from any local client, so
the label set is bounded: the first MAX_FIELD_NAMES distinct names (sanitised) get a label of
their own, every later one is counted under OTHER, and each label is logged once.
"""

from __future__ import annotations

import re

import structlog

from forwarder.events.validate import Leniency
from forwarder.ops.metrics import Stats

log = structlog.get_logger("forwarder.intake")

MAX_FIELD_NAMES = 32
OTHER = "_other"
MAX_LABEL_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def field_label(name: str) -> str:
    """A field name as a metric label and log value: letters, digits, _ . - (others become
    _), at most MAX_LABEL_CHARS characters; "_" for an empty name."""
    return _UNSAFE.sub("_", name[:MAX_LABEL_CHARS]) or "_"


def note(stats: Stats, lenient: Leniency) -> None:
    """Count (and log, once per label) what the drop-in endpoint took leniently."""
    for name in lenient.unknown_fields:
        label = field_label(name)
        counts = stats.unknown_fields
        if label not in counts and len(counts.keys() - {OTHER}) >= MAX_FIELD_NAMES:
            label = OTHER
        if label not in counts:
            log.info(
                "unknown field ignored",
                field=label,
                note="the drop-in endpoint ignores fields the remote does not know; "
                "logged once per name",
            )
        counts[label] += 1
    if lenient.odd_value:
        if not stats.lenient_values:
            log.warning(
                "conversion value not a number",
                note="delivered as sent, as the remote takes it; counted in "
                "forwarder_lenient_values_total, logged once",
            )
        stats.lenient_values += 1
