-- Continue a paused job: paused -> queued with a new queue entry, back in the admission sets, and
-- job.resumed; the next attempt (any worker) forks its steer record at the paused stage. It passes
-- the same admission as a new job, in this one step: the queue cap, and the key's quota of queued
-- and running jobs (a paused job holds neither). The caller's steer record (the paused stage's text
-- replaced) is written here, only by the continue that wins: of two at once, the other finds the
-- job queued and writes nothing. `attempt` is the pause the caller read: a job that ran on and
-- paused again since is `stale`. `token` is fresh per call: a retry whose reply was lost answers
-- as the first run did.
-- KEYS: job, events, jobs, queued, paused, steer
-- ARGV: job_id, maxlen, data, cap, key_quota, steer json ('' to keep it), steer_ttl, attempt, token
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'active_key', 'continue_token')
if j[4] == ARGV[9] then return {'queued'} end
if j[1] ~= 'paused' then return {'not_paused', j[1] or ''} end
if j[2] ~= ARGV[8] then return {'stale', j[2] or ''} end
local depth = redis.call('SCARD', KEYS[4])
if depth >= tonumber(ARGV[4]) then
  depth = reconcile(KEYS[4], {queued = true})
  if depth >= tonumber(ARGV[4]) then return {'full', tostring(depth)} end
end
local quota = tonumber(ARGV[5])
if quota > 0 and j[3] and j[3] ~= '' then
  local mine = redis.call('SCARD', j[3])
  if mine >= quota then
    mine = reconcile(j[3], {queued = true, running = true})
    if mine >= quota then return {'quota', tostring(mine)} end
  end
end
if ARGV[6] ~= '' then redis.call('SET', KEYS[6], ARGV[6], 'EX', ARGV[7]) end
local entry = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'queued', 'entry_id', entry, 'continue_token', ARGV[9])
redis.call('HDEL', KEYS[1], 'paused')
redis.call('SADD', KEYS[4], KEYS[1])
if j[3] and j[3] ~= '' then redis.call('SADD', j[3], KEYS[1]) end
redis.call('ZREM', KEYS[5], ARGV[1])
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', job_maxlen(KEYS[1], ARGV[2]), '*',
                      'event', 'job.resumed', 'attempt', j[2], 'data', ARGV[3])
webhook(KEYS[1], 'job.resumed', ARGV[3], id)
return {'queued'}
