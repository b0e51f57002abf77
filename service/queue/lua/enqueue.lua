-- Admit and enqueue one job: admission (queue cap, the key's quota), job hash, queue entry,
-- job.queued. Idempotent: job ids are fresh per request, so a job hash that already exists means
-- this is a retry whose reply was lost, and it answers as the first run did.
-- KEYS: job, jobs, queued, events, idem, active (the owner's queued+running jobs), owner_jobs
-- ARGV: job_id, cap, request, owner, body_hash, has_idem, idem_ttl, maxlen, key_quota,
--       index_ttl, index_max, [field, value]...
if redis.call('EXISTS', KEYS[1]) == 1 then
  local j = redis.call('HMGET', KEYS[1], 'entry_id', 'position')
  return {'ok', j[1], j[2] or '1'}
end
if ARGV[6] == '1' then
  local seen = redis.call('HMGET', KEYS[5], 'job_id', 'body_hash')
  if seen[1] then
    if seen[2] ~= ARGV[5] then return {'conflict', seen[1]} end
    return {'duplicate', seen[1]}
  end
end
local depth = redis.call('SCARD', KEYS[3])
if depth >= tonumber(ARGV[2]) then
  depth = reconcile(KEYS[3], {queued = true})
  if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
end
local quota = tonumber(ARGV[9])
if quota > 0 then
  local mine = redis.call('SCARD', KEYS[6])
  if mine >= quota then
    mine = reconcile(KEYS[6], {queued = true, running = true})
    if mine >= quota then return {'quota', tostring(mine)} end
  end
end
local now = clock()
local entry = redis.call('XADD', KEYS[2], '*', 'job_id', ARGV[1])
local position = tostring(depth + 1)
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'status', 'queued', 'attempt', '0', 'failures', '0',
           'cancel', '0', 'owner', ARGV[4], 'request', ARGV[3], 'body_hash', ARGV[5],
           'created_at', now, 'entry_id', entry, 'position', position, 'active_key', KEYS[6],
           'events_maxlen', ARGV[8])
for i = 12, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('SADD', KEYS[6], KEYS[1])
-- The owner's job list (GET /v1/generations): newest kept, the key expires with the owner's
-- activity; ids whose job hash has expired are dropped by the reader.
redis.call('ZADD', KEYS[7], math.floor(tonumber(now) * 1000), ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -(tonumber(ARGV[11]) + 1))
redis.call('EXPIRE', KEYS[7], ARGV[10])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'event', 'job.queued', 'attempt', '0',
           'data', cjson.encode({job_id = ARGV[1], attempt = 0, position = depth + 1, ts = tonumber(now)}))
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[5], 'job_id', ARGV[1], 'body_hash', ARGV[5])
  redis.call('EXPIRE', KEYS[5], ARGV[7])
end
return {'ok', entry, position}
