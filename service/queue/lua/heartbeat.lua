-- A worker's heartbeat: its lease (the key, PX the lease, naming the job it runs), its place in the
-- workers zset (by the worker's clock, as /readyz reads it; workers silent for 3 leases leave it),
-- and the liveness record reclaim.lua keys its grace on. Idempotent: a second run writes the same
-- (the liveness record's clock moves on, as a TTL does).
-- KEYS: heartbeat, workers, liveness     ARGV: worker, job_id, lease_ms, now_ms, gap_ms
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[4]) - 3 * tonumber(ARGV[3]))
liveness(KEYS[3], tonumber(ARGV[5]))
return 1
