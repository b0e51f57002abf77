-- Hand a resume's or fork's queue entry to the worker holding the job's warm context, once,
-- when that worker is alive and idle. The reply says whether the entry is now another worker's,
-- read from the pending list: a retry whose reply was lost answers 1 again, so the caller never
-- runs an entry it handed away.
-- KEYS: job, jobs     ARGV: this worker, entry_id, group, heartbeat prefix, job_id, job key prefix
local held = redis.call('XPENDING', KEYS[2], ARGV[3], ARGV[2], ARGV[2], 1)
if #held > 0 and held[1][2] ~= ARGV[1] then return 1 end
local w = redis.call('HGET', KEYS[1], 'warm_worker')
if not w or w == '' or w == ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'warm_worker')  -- routed once at most: no ping-pong
local beat = redis.call('GET', ARGV[4] .. w)
-- gone, or busy with another job (its heartbeat names the job it runs, and that job still runs):
-- rebuild here instead. A heartbeat naming a job that has ended is one beat behind: a fork sent on
-- the parent's terminal event arrives before the holder's next beat.
if not beat then return 0 end
if beat ~= '' and beat ~= ARGV[5] and redis.call('HGET', ARGV[6] .. beat, 'status') == 'running' then
  return 0
end
redis.call('XCLAIM', KEYS[2], ARGV[3], w, 0, ARGV[2], 'JUSTID')
return 1
