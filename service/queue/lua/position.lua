-- 1-based position of a queued entry (read only).
-- KEYS: jobs     ARGV: group, entry_id, limit
local last = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, ld
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then ld = g[i + 1] end
  end
  if name == ARGV[1] then last = ld end
end
local ahead = redis.call('XRANGE', KEYS[1], '(' .. last, ARGV[2], 'COUNT', ARGV[3])
return math.max(1, #ahead)
