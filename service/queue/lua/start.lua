-- A worker got the queue entry: queued/running -> running, attempt += 1, job.started. A job that
-- was `running` is a takeover (its worker died): that counts as a failure, and the trajectory the
-- old attempt named is no longer the job's (that attempt may live on and still write its blob;
-- the new one names its own at its first stage). `token` is fresh per call of the worker, so a
-- retry whose reply was lost answers as the first run did.
-- KEYS: job, jobs, queued, events, dead
-- ARGV: entry_id, group, worker, max_attempts, maxlen, events_ttl, result_ttl, token
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
  return {'gone'}
end
local maxlen = job_maxlen(KEYS[1], ARGV[5])
local C = {job = KEYS[1], jobs = KEYS[2], queued = KEYS[3], events = KEYS[4], dead = KEYS[5],
           group = ARGV[2], maxlen = maxlen, events_ttl = ARGV[6], result_ttl = ARGV[7]}
local j = redis.call('HMGET', KEYS[1], 'status', 'entry_id', 'cancel', 'failures', 'id',
                     'start_token', 'attempt', 'takeover', 'last_error')
local status = j[1]
if j[6] == ARGV[8] then  -- this very call ran already
  local replies = {running = 'run', canceled = 'canceled', failed = 'dead'}
  return {replies[status] or 'skip', j[7], j[8] or '0'}
end
if j[2] ~= ARGV[1] or (status ~= 'queued' and status ~= 'running') then
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
  return {'skip', status or ''}
end
leave_sets(KEYS[1], KEYS[3], false)
local takeover = status == 'running'
local failures = tonumber(j[4] or '0')
if takeover then
  failures = failures + 1
  redis.call('HSET', KEYS[1], 'failures', failures)
  redis.call('HDEL', KEYS[1], 'trajectory_key')
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'start_token', ARGV[8], 'takeover', takeover and '1' or '0')
local now = clock()
if j[3] == '1' then
  finalize(C, 'canceled', 'job.canceled', cjson.encode({job_id = j[5], attempt = attempt, ts = tonumber(now)}),
           attempt, now)
  return {'canceled', tostring(attempt)}
end
if failures >= tonumber(ARGV[4]) then
  -- The last real cause when a worker wrote one before it died; else the workers' loss itself.
  local err = {type = 'worker_lost', message = 'the job lost its worker on ' .. failures .. ' attempts'}
  if j[9] then err = cjson.decode(j[9]) end
  redis.call('HSET', KEYS[1], 'error', cjson.encode(err))
  finalize(C, 'failed', 'job.failed',
           cjson.encode({job_id = j[5], attempt = attempt, error = err, ts = tonumber(now)}), attempt, now)
  return {'dead', tostring(attempt)}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'attempt_started_at', now,
           'seq', '0', 'progress_at', now)
redis.call('HSETNX', KEYS[1], 'started_at', now)
local started = cjson.encode({job_id = j[5], attempt = attempt, worker = ARGV[3], takeover = takeover,
                              ts = tonumber(now)})
local started_id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'event', 'job.started',
                              'attempt', tostring(attempt), 'data', started)
webhook(KEYS[1], 'job.started', started, started_id)
return {'run', tostring(attempt), takeover and '1' or '0'}
