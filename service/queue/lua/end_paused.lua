-- A paused job ends (canceled): the same steps as the prelude's finalize, minus the queue entry
-- (a paused job's entry is already acknowledged). `token` is fresh per call: a retry whose reply
-- was lost answers as the first run did.
-- KEYS: job, events, paused
-- ARGV: job_id, maxlen, events_ttl, result_ttl, data, error ('' for none), expired_before_ms ('' any),
--       token
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'end_token')
if j[3] == ARGV[8] then return {'canceled'} end
if j[1] ~= 'paused' then redis.call('ZREM', KEYS[3], ARGV[1]) return {'not_paused', j[1] or ''} end
if ARGV[7] ~= '' then
  local due = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if due and tonumber(due) > tonumber(ARGV[7]) then return {'not_due'} end
end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', clock(), 'worker', '', 'cancel', '1',
           'end_token', ARGV[8])
redis.call('HDEL', KEYS[1], 'paused')
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[6]) end
redis.call('ZREM', KEYS[3], ARGV[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', job_maxlen(KEYS[1], ARGV[2]), '*',
                      'event', 'job.canceled', 'attempt', j[2], 'data', ARGV[5])
webhook(KEYS[1], 'job.canceled', ARGV[5], id)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'canceled'}
