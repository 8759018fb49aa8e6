"""Fleet mode (issue 17): everything that talks to Redis.

Many hosts run a forwarder each against one account; with `fleet.redis_url` set they share what
must be shared through one Redis 7 server, reached through redis-py's asyncio client (the
`fleet` extra: `import redis` happens only here, and only when a fleet is configured).

- `connection.py`: the one client per process (URL, TLS, password, timeouts and retries on every
  call), the key layout, and the server's durability settings checked at start.
- `budget.py`: `RedisRateBudget`, an account's rate budget shared by the fleet (a Lua script on
  Redis's own clock), with the local fallback when Redis does not answer.
- `members.py`: this host's heartbeat and the live members (`P:members`).

Every key of one account carries the hash tag `{PREFIX:ACCOUNT}`, so a cluster keeps them in one
slot and a script touches one slot only (docs/how-to/fleet.md has the layout).
"""
