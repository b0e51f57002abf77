-- A job that asked for pauses stops after such a stage: running -> paused (fenced on the
-- attempt), its steer record written (the trajectory blob key, the point, the image keys), its
-- queue entry acknowledged (no worker holds it), out of its owner's active set, job.paused, and
-- an entry in the expiry zset. A retry whose reply was lost answers as the first.
-- KEYS: job, events, jobs, paused, queued, steer
-- ARGV: attempt, group, maxlen, expires_ms, data, paused_json, steer_json, steer_ttl_s, trajectory_key
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'entry_id', 'cancel', 'id')
if j[1] == 'paused' and j[2] == ARGV[1] then return {'paused'} end
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
if j[4] == '1' then return {'cancel'} end
redis.call('HSET', KEYS[1], 'status', 'paused', 'worker', '', 'paused', ARGV[6], 'trajectory_key', ARGV[9])
redis.call('SET', KEYS[6], ARGV[7], 'EX', ARGV[8])
leave_sets(KEYS[1], KEYS[5], true)
if j[3] then redis.call('XACK', KEYS[3], ARGV[2], j[3]) end
redis.call('ZADD', KEYS[4], ARGV[4], j[5])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', job_maxlen(KEYS[1], ARGV[3]), '*',
                      'event', 'job.paused', 'attempt', ARGV[1], 'data', ARGV[5])
webhook(KEYS[1], 'job.paused', ARGV[5], id)
return {'paused'}
