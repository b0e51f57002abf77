-- Continue a paused job: paused -> queued with a new queue entry (back in the admission sets),
-- and job.resumed; the next attempt (any worker) forks its steer record at the paused stage.
-- KEYS: job, events, jobs, queued, paused     ARGV: job_id, maxlen, data
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'active_key')
if j[1] ~= 'paused' then return {'not_paused', j[1] or ''} end
local entry = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'queued', 'entry_id', entry)
redis.call('HDEL', KEYS[1], 'paused')
redis.call('SADD', KEYS[4], KEYS[1])
if j[3] and j[3] ~= '' then redis.call('SADD', j[3], KEYS[1]) end
redis.call('ZREM', KEYS[5], ARGV[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', job_maxlen(KEYS[1], ARGV[2]), '*',
                      'event', 'job.resumed', 'attempt', j[2], 'data', ARGV[3])
webhook(KEYS[1], 'job.resumed', ARGV[3], id)
return {'queued'}
