-- queued: canceled at once; running: a flag the worker sees at its next event. Idempotent, reply
-- included: a second run finds the job canceled (and answers 'canceled' again), or the flag set.
-- KEYS: job, events, jobs, queued, dead     ARGV: group, maxlen, events_ttl, result_ttl
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local j = redis.call('HMGET', KEYS[1], 'status', 'id', 'attempt')
if j[1] == 'canceled' then return {'canceled'} end
if j[1] ~= 'queued' and j[1] ~= 'running' then return {'terminal', j[1]} end
redis.call('HSET', KEYS[1], 'cancel', '1')
if j[1] == 'queued' then
  local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], queued = KEYS[4], dead = KEYS[5],
             group = ARGV[1], maxlen = job_maxlen(KEYS[1], ARGV[2]), events_ttl = ARGV[3],
             result_ttl = ARGV[4]}
  local now = clock()
  finalize(C, 'canceled', 'job.canceled',
           cjson.encode({job_id = j[2], attempt = tonumber(j[3]), ts = tonumber(now)}), j[3], now)
  return {'canceled'}
end
return {'canceling'}
