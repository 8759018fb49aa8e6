"""The storage stage: where accepted events wait for delivery. The in-memory queue and
backlog, held events, event numbering and status look-ups; the SQLite spool in `sqlite/`.
"""
