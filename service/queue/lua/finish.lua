-- Terminal state + terminal event + XACK (+ dead letter when failed), fenced by the attempt.
-- The fields go on the job hash with it: a succeeded job's name its trajectory blob
-- (trajectory_key, {job}/{attempt}/trajectory.json, written by the worker just before).
-- KEYS: job, events, jobs, dead, stats, queued
-- ARGV: attempt, status, event, data, group, maxlen, events_ttl, result_ttl, [field, value]...
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'attempt_started_at')
if j[1] == ARGV[2] and j[2] == ARGV[1] then return {'ok'} end  -- a retry whose reply was lost
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
local C = {job = KEYS[1], events = KEYS[2], jobs = KEYS[3], queued = KEYS[6], dead = KEYS[4],
           group = ARGV[5], maxlen = job_maxlen(KEYS[1], ARGV[6]), events_ttl = ARGV[7],
           result_ttl = ARGV[8]}
if #ARGV > 8 then redis.call('HSET', KEYS[1], unpack(ARGV, 9)) end
local now = clock()
if ARGV[2] == 'succeeded' and j[3] then
  local run = tonumber(now) - tonumber(j[3])
  local old = tonumber(redis.call('HGET', KEYS[5], 'run_seconds_ewma') or tostring(run))
  redis.call('HSET', KEYS[5], 'run_seconds_ewma', tostring(0.8 * old + 0.2 * run))
end
finalize(C, ARGV[2], ARGV[3], ARGV[4], ARGV[1], now)
return {'ok'}
