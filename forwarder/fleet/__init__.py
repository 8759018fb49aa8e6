"""Fleet mode (issue 17): everything that talks to Redis.

Many hosts run a forwarder each against one account; with `fleet.redis_url` set they share what
must be shared through one Redis 7 server, reached through redis-py's asyncio client (the
`fleet` extra: `import redis` happens only here, and only when a fleet is configured).

- `connection.py`: the one client per process (URL, TLS, password, timeouts and retries on every
  call), the key layout, and the server's durability settings checked at start (every node of
  a cluster); `topology.py`: where Redis is (one server, Sentinel or a Cluster) and its client.
- `budget.py`: `RedisRateBudget`, an account's rate budget shared by the fleet (the Lua script
  of `budgetscript.py`, on Redis's own clock; `budgetanswer.py` merges the remote's answers it
  carries), with the local fallback when Redis does not answer.
- `members.py`: this host's heartbeat and the live members (`P:members`).

The shared queue (queue.mode "fleet"):

- `fleetlog.py`: the event-log backend registered as "fleet" (storage/log.py): intake's appends,
  the window, the lanes' outcomes, the stop;
- `partition.py`: a recipient's partition (a stable hash); `queuekeys.py`: the queue's keys;
- `leases.py`: partition leases with generations, renewed, stopped locally before they end;
- `ownership.py`: each member's fair share of the partitions among the live consumers, drains;
- `streams.py`: appends, ordered reads, claims of a dead member's entries, fenced settles;
- `window.py`: the held partitions' events loaded into the lanes' queue, their outcomes settled;
- `outcomes.py`: what became of each event, kept in Redis by the settles, so any host answers
  `GET /v1/events/{id}`; `accepted.py`: the numbers this host answered, kept across restarts;
- `fallback.py`: the local spool while Redis is unreachable, and the mover back into Redis;
- `queuestatus.py`, `deadletters.py`: what `forwarder fleet status`, `fleet drain` and
  `forwarder dlq` read and change.

Every key of one account carries the hash tag `{PREFIX:ACCOUNT}`, so a cluster keeps them in one
slot and a script touches one slot only (docs/how-to/fleet.md has the layout).
"""
