"""The `forwarder` command: the entry point and `run`, `reload`, `check-config`, `send`,
`mock-remote`, `demo` (`main`); dead letters and spool stats (`dlq`), a spool file's inspection
and recovery (`spool`), `events show` (`events`), `status`, and how they reach a running daemon
(`daemonclient`).
"""
