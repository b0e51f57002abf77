-- Move one pending entry whose owner has no heartbeat key to the caller. The lease is the
-- heartbeat key's TTL, not the entry's idle time: a slow live worker is never robbed.
-- Only an idle caller (no pending entry of its own) takes one, so a reclaimed job never waits
-- behind a running one, and a retried call (its reply lost) takes nothing more.
-- Nothing is taken until Redis has been up for `min_uptime` seconds: heartbeat keys expire while
-- Redis is down, and live workers need that long to write them again after a restart.
-- KEYS: jobs     ARGV: group, worker, heartbeat prefix, min_uptime
local info = redis.call('INFO', 'server')
local uptime = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
if uptime < tonumber(ARGV[4]) then return {} end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 100)
for _, p in ipairs(pending) do
  local id, owner = p[1], p[2]
  if owner ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. owner) == 0 then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    if #claimed > 0 then return {id, owner} end
  end
end
return {}
