"""The storage stage: where accepted events wait for delivery. The event log seam and its
registry (`log`), its backends (`memory`, `durable`, and what they share of the spool in
`spooled`), the in-memory queue and backlog, held events, event numbering and status look-ups;
the SQLite spool in `sqlite/`.
"""
