-- Trim the queue stream of what every reader is done with: ids below both the group's
-- last-delivered id and its oldest pending entry (default XTRIM would also drop pending and
-- undelivered jobs). Idempotent: a second run finds nothing more below the floor.
-- KEYS: jobs     ARGV: group
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] then floor = last end
end
if not floor then return 0 end
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
if tonumber(summary[1]) > 0 and older(summary[2], floor) then floor = summary[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
