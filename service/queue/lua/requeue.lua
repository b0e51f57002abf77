-- Hand the job back (SIGTERM) or retry it after an error: the entry moves to the never-alive
-- HANDBACK consumer, so the next reclaim of any worker picks it up first. The error (if any) is
-- kept as the job's last cause. Idempotent: a second run finds the job no longer held by the
-- attempt (queued, or terminal) and changes nothing, answering as the first did.
-- KEYS: job, events, jobs, queued, dead
-- ARGV: attempt, reason (handback|retry), group, handback consumer, max_attempts, error json or '',
--       maxlen, events_ttl, result_ttl
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'entry_id', 'cancel', 'id')
if j[2] == ARGV[1] then  -- a retry whose reply (or its replicas' acknowledgement) was lost
  if j[1] == 'queued' then return {'queued'} end
  if j[1] == 'failed' then return {'dead'} end
  if j[1] == 'canceled' then return {'canceled'} end
end
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
local maxlen = job_maxlen(KEYS[1], ARGV[7])
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], queued = KEYS[4], dead = KEYS[5],
           group = ARGV[3], maxlen = maxlen, events_ttl = ARGV[8], result_ttl = ARGV[9]}
local now = clock()
local attempt = tonumber(ARGV[1])
if j[4] == '1' then
  finalize(C, 'canceled', 'job.canceled', cjson.encode({job_id = j[5], attempt = attempt}), attempt, now)
  return {'canceled'}
end
local err = nil
if ARGV[6] ~= '' then
  err = cjson.decode(ARGV[6])
  redis.call('HSET', KEYS[1], 'last_error', ARGV[6])
end
if ARGV[2] == 'retry' then
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  if failures >= tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[1], 'error', ARGV[6])
    finalize(C, 'failed', 'job.failed', cjson.encode({job_id = j[5], attempt = attempt, error = err}),
             attempt, now)
    return {'dead'}
  end
end
redis.call('XCLAIM', KEYS[3], ARGV[3], ARGV[4], 0, j[3], 'JUSTID')
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '')
redis.call('SADD', KEYS[4], KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', 'job.queued', 'attempt', ARGV[1],
           'data', cjson.encode({job_id = j[5], attempt = attempt, reason = ARGV[2], error = err}))
return {'queued'}
