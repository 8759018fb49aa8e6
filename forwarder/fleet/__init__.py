"""Fleet mode: everything that talks to Redis, so many hosts share one account's rate budget and
one queue (issue 17; docs/how-to/fleet.md).

The shared queue (queue.mode "fleet"): `partition.py` maps a recipient to a partition of its
account's stream, `queuekeys.py` names the Redis keys, `leases.py` owns partitions (leases with
generations, renewed, stopped locally before they end), `streams.py` appends, reads and settles
stream entries (every settle fenced by the lease in the same script).
"""
