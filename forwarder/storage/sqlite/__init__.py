"""The SQLite spool (durable mode): the daemon's handle with its group commit, the file's
schema and row codec, schema upgrades, recovery of damaged files and the outcome table.
"""
