-- Hand the job back (SIGTERM), retry it after an error, or defer it (it could not be prepared: the
-- blob store was away): the entry moves to the never-alive HANDBACK consumer, so the next reclaim
-- of any worker picks it up first. A retry counts a failure (max_attempts of them end the job
-- failed); a deferral counts only toward max_deferrals (past them the job fails with its error).
-- The error (if any) is kept as the job's last cause. Idempotent, reply included: a second run
-- finds the job no longer held by the attempt and answers as the first run did.
-- KEYS: job, events, jobs, queued, dead
-- ARGV: attempt, reason (handback|retry|defer), group, handback consumer, max_attempts,
--       error json or '', maxlen, events_ttl, result_ttl, max_deferrals
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'entry_id', 'cancel', 'id', 'requeued')
if j[2] == ARGV[1] and j[6] == ARGV[1] then  -- a retry whose reply was lost
  local replies = {queued = 'queued', failed = 'dead', canceled = 'canceled'}
  if replies[j[1]] then return {replies[j[1]]} end
end
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
redis.call('HSET', KEYS[1], 'requeued', ARGV[1])
local maxlen = job_maxlen(KEYS[1], ARGV[7])
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], queued = KEYS[4], dead = KEYS[5],
           group = ARGV[3], maxlen = maxlen, events_ttl = ARGV[8], result_ttl = ARGV[9]}
local now = clock()
local attempt = tonumber(ARGV[1])
if j[4] == '1' then
  finalize(C, 'canceled', 'job.canceled',
           cjson.encode({job_id = j[5], attempt = attempt, ts = tonumber(now)}), attempt, now)
  return {'canceled'}
end
local err = nil
if ARGV[6] ~= '' then
  err = cjson.decode(ARGV[6])
  redis.call('HSET', KEYS[1], 'last_error', ARGV[6])
end
local give_up = false
if ARGV[2] == 'retry' then
  give_up = redis.call('HINCRBY', KEYS[1], 'failures', 1) >= tonumber(ARGV[5])
elseif ARGV[2] == 'defer' then
  give_up = redis.call('HINCRBY', KEYS[1], 'deferrals', 1) > tonumber(ARGV[10])
end
if give_up then
  redis.call('HSET', KEYS[1], 'error', ARGV[6])
  finalize(C, 'failed', 'job.failed',
           cjson.encode({job_id = j[5], attempt = attempt, error = err, ts = tonumber(now)}), attempt, now)
  return {'dead'}
end
redis.call('XCLAIM', KEYS[3], ARGV[3], ARGV[4], 0, j[3], 'JUSTID')
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker', '')
redis.call('SADD', KEYS[4], KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', 'job.queued', 'attempt', ARGV[1],
           'data', cjson.encode({job_id = j[5], attempt = attempt, reason = ARGV[2], error = err,
                                 ts = tonumber(now)}))
return {'queued'}
