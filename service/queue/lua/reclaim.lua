-- Move one pending entry whose owner has no heartbeat key to the caller. The lease is the
-- heartbeat key's TTL, not the entry's idle time: a slow live worker is never robbed.
-- Only an idle caller (no pending entry of its own) takes one, so a reclaimed job never waits
-- behind a running one, and a retried call (its reply lost) takes nothing more.
-- Heartbeat keys expire while the workers cannot write them (Redis down or restarted, a failover
-- to a replica, writes refused), so a live worker's key may be missing. Then nothing is taken
-- until the grace is over: Redis up for `grace` (a restart), and the liveness record (prelude.lua)
-- unbroken for `grace` (the same master, with workers writing through it: a failover, an outage).
-- Entries handed back (owner: the handback consumer) are no worker's: they are taken at any time.
-- KEYS: jobs, liveness     ARGV: group, worker, heartbeat prefix, grace_ms, gap_ms, handback consumer
local grace = tonumber(ARGV[4])
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
local now, since = liveness(KEYS[2], tonumber(ARGV[5]))
local quiet = uptime * 1000 < grace or now - since < grace
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100)
for _, p in ipairs(pending) do
  local id, owner = p[1], p[2]
  local free = owner == ARGV[6] or (not quiet and redis.call('EXISTS', ARGV[3] .. owner) == 0)
  if owner ~= ARGV[2] and free then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    if #claimed > 0 then return {id, owner} end
  end
end
return {}
