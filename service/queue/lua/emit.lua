-- Append an event (and update the job hash) if the attempt still holds the job. `seq` numbers an
-- attempt's emits from 1: a retried emit whose reply was lost is not applied twice. The fields of
-- a stage.completed name the attempt's trajectory blob (trajectory_key, written just before): the
-- fence keeps a stale attempt's blob from ever being named. The reply is the same on a retry:
-- {'ok', cancel flag} or {'fenced'} (the event's id is not in it: a retry could not repeat it).
-- KEYS: job, events     ARGV: attempt, seq, event ('' for none), data, maxlen, [field, value]...
local j = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'cancel', 'seq', 'events_maxlen')
if j[1] ~= 'running' or j[2] ~= ARGV[1] then return {'fenced'} end
if tonumber(ARGV[2]) <= tonumber(j[4] or '0') then return {'ok', j[3] or '0'} end
redis.call('HSET', KEYS[1], 'seq', ARGV[2])
local id = ''
if ARGV[3] ~= '' then
  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', j[5] or ARGV[5], '*',
                  'event', ARGV[3], 'attempt', ARGV[1], 'data', ARGV[4])
  webhook(KEYS[1], ARGV[3], ARGV[4], id)
end
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
return {'ok', j[3] or '0'}
