-- Puts a request that a crash left outside every queue and registry back at the front of its queue, after
-- checking again, atomically, that it is still where the sweep found it: `queued` but in no queue,
-- `scheduled` but not in the ScheduledJobRegistry, or `started` with no live Execution. Returns 1 if it
-- was queued again, 0 if it had moved on meanwhile.
local job_key = KEYS[1]
local queue_key = KEYS[2]
local scheduled_registry = KEYS[3]
local job_executions = KEYS[4] -- the job's ExecutionRegistry

local id = ARGV[1]
local seen_status = ARGV[2]

local status = redis.call('HGET', job_key, 'status')
if status ~= seen_status then return 0 end
if status == 'queued' and redis.call('LPOS', queue_key, id) then return 0 end
if status == 'scheduled' and redis.call('ZSCORE', scheduled_registry, id) then return 0 end
if status == 'started' and redis.call('ZCARD', job_executions) > 0 then return 0 end
redis.call('HSET', job_key, 'status', 'queued')
redis.call('LPUSH', queue_key, id)
return 1
