"""Events: what an app sends, checked into the `Event` every stage shares.

`model` holds the `Event` (the form it is sent to the remote in, its record in the files),
the limits of its fields and the answers of a refusal (`FieldError`, `EventValidationError`);
`ids` makes fresh event ids; `parse` reads JSON and NDJSON bodies keeping every number as the
app wrote it; `validate` checks a form or JSON object field by field into an `Event`,
collecting every problem instead of stopping at the first one, so a batch can be answered with
one complete list and apps can fix everything in one go.

`Event` is re-exported here because it is the shared type of every stage; everything else is
imported from the module it lives in.
"""

from forwarder.events.model import Event

__all__ = ["Event"]
