"""The Lua script of the shared rate budget: one atomic step on `{P:A}:budget`, on Redis's clock.

It is `RateLimiter` (delivery/flow/ratelimit.py) moved into Redis, so every host of the fleet
counts against one state: a pacing bucket (GCRA: `tat`, the theoretical arrival time, with a
burst of `burst_ms` worth of the rate) under a count of the tokens handed out in the remote's
current window (`used`, plus `external`: what the remote counted beyond them), the window's end
learned from `X-RateLimit-Reset`, and the pause a 429 imposes on the whole account.

One call does, in order: give back a host's unused tokens (of the same window), apply the newest
answer a host saw (its limit, remaining, reset, 429), and take up to `want` tokens. Every time
is `redis.call('TIME')` in milliseconds; a host sends only durations (how old its answer is,
what the reset said), so a host whose clock is off changes nothing. The script touches one key,
so it runs on a cluster too.

KEYS[1]: the budget hash. ARGV: want, give_back, give_back_epoch, default_limit, window_ms (0:
the host has learnt none, use the fleet's),
burst_ms, granularity_ms, default_429_ms, max_pause_ms, ttl_ms, then the answer: has_answer
(0/1), epoch, age_ms, limit, remaining, reset_ms, rate_limited (0/1), retry_after_ms (-1: none),
ahead_ms, and a host's return from fallback: back_share (0: not one), back_others, back_ms,
back_sent. Returns {granted, epoch, wait_ms, window_left_ms, paused_left_ms, limit, remaining,
window_ms, rate_limited, delay_ms, certain_left_ms}.

Tokens are reserved, GCRA's way: a batch is granted at once with the time it conforms (at most
`ahead_ms` from now, and before the window's end), and `tat` moves past it. The host waits that
long and sends them: one call per batch, none wasted on polling while other hosts take turns.

No window over the quota, also right after an outage. Three things made the fleet overshoot by
a few requests in the windows after Redis came back; each is closed at its cause:

- The window's end is uncertain. A reset is whole seconds rounded up, so an answer says the
  window ends in (reset - 1 s, reset]: `window_end` is the lowest upper bound, `end_lo` the
  highest lower bound (`ends - granularity`). A token sent between them may count in either
  window, and once the next window starts here it would be in nobody's count. So a batch is
  granted only to be sent before `end_lo`, and a host drops its tokens there
  (`certain_left_ms`); until `window_end` the fleet waits (in steady operation the two are
  milliseconds apart: answers at every phase narrow them; right after an outage up to a
  second, once). A window the fleet starts by itself after `window_end` surely runs a whole
  window (its first request starts the remote's), unless members may still be in fallback.
- Hosts come back one by one, each at its next heartbeat, while the others still send their
  fallback shares. The first host back holds back the shares of the other live members
  (`fb_pending` x `fb_share`) from every window until all of them can have come back
  (`back_ms`: a heartbeat and its bound); each host back releases its own.
- What a host sent alone is in no host's tokens: a host back tells what it sent in its last
  local window (`back_sent`), and the window counts at least that much beyond its tokens.

What is left: another client of the same API key (no answer tells of it before it happened),
and the round trip. The bounds are placed when a host reads an answer, not when the remote
computed it, so a request sent within about one round trip of a window's end may still arrive
in the next window: at most the requests of one round trip, and only at a window's very end
(in the tests with 2-second windows: one 429 in about ten runs through a frozen Redis; with
one-minute windows, thirty times rarer).
"""

from __future__ import annotations

BUDGET_LUA = """
local key = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local back = tonumber(ARGV[2])
local back_epoch = tonumber(ARGV[3])
local default_limit = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local burst_ms = tonumber(ARGV[6])
local granularity = tonumber(ARGV[7])
local default_429 = tonumber(ARGV[8])
local max_pause = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local ahead_ms = tonumber(ARGV[19])
local back_share = tonumber(ARGV[20])
local back_others = tonumber(ARGV[21])
local back_ms = tonumber(ARGV[22])
local back_sent = tonumber(ARGV[23])

local s = redis.call('HMGET', key, 'limit', 'window_end', 'confirmed', 'epoch', 'used',
  'external', 'tat', 'paused_until', 'rate_limited', 'window_ms', 'end_lo', 'fb_pending',
  'fb_share', 'fb_until', 'fb_sent')
-- 0: the host has not learnt the window's length yet (just started, or a reload): the fleet's.
if window <= 0 then window = tonumber(s[10]) or 60000 end
local limit = tonumber(s[1]) or default_limit
local window_end = tonumber(s[2]) or (now + window)
local confirmed = tonumber(s[3]) or 0
local epoch = tonumber(s[4]) or 0
local used = tonumber(s[5]) or 0
local external = tonumber(s[6]) or 0
local tat = tonumber(s[7]) or now
local paused = tonumber(s[8]) or 0
local limited = tonumber(s[9]) or 0
local end_lo = tonumber(s[11]) or (window_end - granularity)
local fb_pending = tonumber(s[12]) or 0
local fb_share = tonumber(s[13]) or 0
local fb_until = tonumber(s[14]) or 0
local fb_sent = tonumber(s[15]) or 0

local function new_window(ends, conf, lo)
  epoch = epoch + 1
  used = 0
  external = 0
  fb_sent = 0
  window_end = ends
  end_lo = lo
  confirmed = conf
end

-- A host back from fallback: the members that may still serve their shares locally.
if back_share > 0 then
  if now < fb_until and fb_pending > 0 then
    fb_pending = fb_pending - 1
  else
    fb_pending = back_others
    fb_until = now + back_ms
  end
  fb_share = back_share
end

-- Tokens a host took and did not use, of the window they were counted in.
if back > 0 and back_epoch == epoch then
  used = math.max(0, used - back)
  tat = math.max(now, tat - back * window / limit)
end

-- The newest answer a host saw, `age` ms ago.
if ARGV[11] == '1' then
  local obs_epoch = tonumber(ARGV[12])
  local at = now - tonumber(ARGV[13])
  local o_limit = tonumber(ARGV[14])
  local o_remaining = tonumber(ARGV[15])
  local o_reset = tonumber(ARGV[16])
  local o_retry = tonumber(ARGV[18])
  local started_new = false
  if o_limit > 0 then limit = o_limit end
  if o_reset >= 0 and obs_epoch == epoch then
    local ends = at + o_reset
    if confirmed == 0 then
      window_end = ends
      end_lo = math.min(ends, math.max(end_lo, ends - granularity))
      confirmed = 1
    elseif ends > window_end + granularity then
      -- The remote started a window we had not counted in: what it counted so far is all we know.
      new_window(ends, 1, ends - granularity)
      started_new = true
    else
      -- A reset is rounded up: every answer is an upper bound, the lowest is the best.
      window_end = math.min(window_end, ends)
      end_lo = math.min(window_end, math.max(end_lo, ends - granularity))
    end
  end
  if o_remaining >= 0 then
    if obs_epoch == epoch then
      external = math.max(external, limit - o_remaining - used)
    elseif started_new then
      external = math.max(0, limit - o_remaining)
    end
  end
  if ARGV[17] == '1' then
    limited = limited + 1
    local wait = -1
    if o_reset >= 0 then wait = math.min(o_reset, max_pause) end
    if o_retry > wait then wait = o_retry end
    if wait <= 0 then wait = default_429 end
    paused = math.max(paused, at + wait)
    -- Nothing more fits in this window; the next starts when the pause ends.
    window_end = at + wait
    end_lo = window_end
    confirmed = 1
    external = limit
  end
end

-- Shares the members still in fallback may send, held back from the fleet's windows.
local reserved = 0
if now < fb_until then reserved = math.min(limit, fb_pending * fb_share) end

local granted = 0
local wait = 0
local delay = 0
if now < paused then
  wait = paused - now
else
  if now >= window_end then
    -- The fleet alone starts the remote's next window (its first request after this one
    -- ended): it runs a whole window from now. With members in fallback it may have begun.
    local lo = now + window
    if reserved > 0 then lo = lo - granularity end
    new_window(now + window, 0, lo)
  end
  if back_share > 0 then
    -- What the hosts back from fallback sent alone in their last window (all of it, though
    -- some may have counted in the window before): it is in no host's tokens.
    fb_sent = fb_sent + back_sent
    external = math.max(external, fb_sent)
  end
  local remaining = limit - used - external - reserved
  if remaining <= 0 then
    wait = math.max(window_end - now, 1)
  elseif want > 0 then
    -- GCRA: a token conforms from tat - tau on; the k-th of a batch, (k - 1) intervals later.
    local interval = window / limit
    local cap = math.max(1, math.floor(burst_ms / interval))
    local tau = (cap - 1) * interval
    if tat < now then tat = now end
    local k = math.min(want, remaining, cap)
    local ready = math.max(now, tat + (k - 1) * interval - tau)
    if ready - now > ahead_ms then
      wait = ready - now - ahead_ms
    elseif ready >= end_lo then
      -- Sent after the window's earliest possible end, they might count in the next one:
      -- wait until it has surely begun (or an answer says it has).
      wait = math.max(window_end - now, 1)
    else
      -- Reserved: the host sends them from `ready` on (a wait of at most ahead_ms).
      granted = k
      delay = ready - now
      tat = tat + k * interval
      used = used + k
    end
  end
end

redis.call('HSET', key, 'limit', limit, 'window_ms', window, 'window_end', window_end,
  'confirmed', confirmed, 'epoch', epoch, 'used', used, 'external', external,
  'tat', string.format('%.3f', tat), 'paused_until', paused, 'rate_limited', limited,
  'updated', now, 'end_lo', end_lo, 'fb_pending', fb_pending, 'fb_share', fb_share,
  'fb_until', fb_until, 'fb_sent', fb_sent)
redis.call('PEXPIRE', key, ttl)
return {granted, epoch, math.ceil(wait), math.max(0, window_end - now),
  math.max(0, paused - now), limit, math.max(0, limit - used - external - reserved), window,
  limited, math.ceil(delay), math.max(0, end_lo - now)}
"""
