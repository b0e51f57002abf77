-- Shared by the scripts that move jobs (prepended to each when redis_client.py loads them).

local function clock()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end

-- A job leaves the admission sets when it stops being queued (the global set) or active (its
-- owner's set). Members are job-hash keys; `active_key` (written at enqueue) names the owner's set.
local function leave_sets(job, queued, also_active)
  redis.call('SREM', queued, job)
  if also_active then
    local active = redis.call('HGET', job, 'active_key')
    if active and active ~= '' then redis.call('SREM', active, job) end
  end
end

-- Webhooks (docs/webhooks.md): an event the job subscribed to is copied into the outbox, in the
-- same script as the event itself, with the signer (the API key whose secrets sign it: the owner's
-- id, never a secret). The job hash has webhook_url, webhook_events (",name,name,") and
-- webhook_signer; called right after every XADD of an event a webhook may want. The outbox holds
-- at most {{WEBHOOK_OUTBOX_MAX}} messages: past that, a new one is not queued but counted and
-- recorded in the webhooks' dead letters (error "outbox full"); the event stays in the job's log.
local function webhook(job, event, data, event_id)
  local w = redis.call('HMGET', job, 'webhook_url', 'webhook_events', 'id', 'webhook_signer')
  if w[1] and w[2] and string.find(w[2], ',' .. event .. ',', 1, true) then
    if redis.call('XLEN', '{{WEBHOOK_OUTBOX}}') >= {{WEBHOOK_OUTBOX_MAX}} then
      redis.call('INCR', '{{WEBHOOK_DROPPED}}')
      redis.call('XADD', '{{WEBHOOK_DEAD}}', 'MAXLEN', '~', 100000, '*', 'job_id', w[3], 'event', event,
                 'event_id', event_id, 'url', w[1], 'attempts', '0', 'error', 'outbox full')
      return
    end
    redis.call('XADD', '{{WEBHOOK_OUTBOX}}', '*', 'job_id', w[3], 'event', event, 'event_id', event_id,
               'url', w[1], 'data', data, 'signer', w[4] or '')
  end
end

-- The one way a job ends: state, terminal event, expiry, acknowledgement, dead letter.
-- C = {job, events, jobs, queued, dead, group, maxlen, events_ttl, result_ttl}
local function finalize(C, status, event, data, attempt, now)
  local j = redis.call('HMGET', C.job, 'entry_id', 'id')
  redis.call('HSET', C.job, 'status', status, 'finished_at', now, 'worker', '')
  leave_sets(C.job, C.queued, true)
  local id = redis.call('XADD', C.events, 'MAXLEN', '~', C.maxlen, '*',
                        'event', event, 'attempt', tostring(attempt), 'data', data)
  webhook(C.job, event, data, id)
  redis.call('EXPIRE', C.events, C.events_ttl)
  redis.call('EXPIRE', C.job, C.result_ttl)
  if j[1] then redis.call('XACK', C.jobs, C.group, j[1]) end
  if status == 'failed' then
    redis.call('XADD', C.dead, 'MAXLEN', '~', 100000, '*',
               'job_id', j[2], 'attempt', tostring(attempt), 'data', data, 'at', now)
  end
end

-- The events-stream bound of a job: written at enqueue from its request (budget.py).
local function job_maxlen(job, default)
  return redis.call('HGET', job, 'events_maxlen') or default
end

-- Drop members of an admission set whose job is no longer in one of the `wanted` states (or is
-- gone): the sets are checked against the job hashes, the truth, whenever they look full.
local function reconcile(set, wanted)
  for _, member in ipairs(redis.call('SMEMBERS', set)) do
    local status = redis.call('HGET', member, 'status')
    if not status or not wanted[status] then redis.call('SREM', set, member) end
  end
  return redis.call('SCARD', set)
end

-- The workers' liveness as this server sees it (the hash keys.LIVENESS): the server's replication
-- id (a new one after a failover or a restart) and when a worker last wrote through it (ms, this
-- server's clock). A new id, or no worker for `gap_ms`, starts a grace (`since`): heartbeat keys
-- may have expired meanwhile without their workers being dead, so reclaim.lua takes no live-looking
-- worker's job until the grace is over and the workers have written their heartbeats again.
-- Returns now, since.
local function liveness(key, gap_ms)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
  local seen = redis.call('HMGET', key, 'replid', 'seen_at', 'since')
  local since = tonumber(seen[3] or '0')
  if seen[1] ~= replid or not seen[2] or now - tonumber(seen[2]) > gap_ms then since = now end
  redis.call('HSET', key, 'replid', replid, 'seen_at', now, 'since', since)
  return now, since
end
