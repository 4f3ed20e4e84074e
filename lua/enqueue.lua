-- Enqueues one request in one round trip: refuses a duplicate (idempotency key) or a full queue, else
-- stores the job hash and pushes its id: exactly the writes RQ's Queue.enqueue makes (HSET job, RPUSH
-- queue, SADD rq:queues), plus our open-requests index. Returns {'queued'}, {'full'} or
-- {'duplicate', '<first request id> <fingerprint>'}.
local queue_key = KEYS[1]
local job_key = KEYS[2]
local queues_set = KEYS[3]
local open_requests = KEYS[4]
local idempotency_key = KEYS[5] -- optional

local max_queue_length = tonumber(ARGV[1])
local job_id = ARGV[2]
local may_wait = ARGV[3] -- seconds it may wait to start; '' for no limit
local idempotency_value = ARGV[4] -- '<job id> <fingerprint>'
local idempotency_ttl = ARGV[5]
local first_job_field = 6 -- ARGV[6..]: the job hash's field/value pairs

if idempotency_key then
  local seen = redis.call('GET', idempotency_key)
  if seen then return {'duplicate', seen} end
end
if redis.call('LLEN', queue_key) >= max_queue_length then return {'full'} end
local clock = redis.call('TIME') -- one clock for every host: expiry is judged on it everywhere
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('HSET', job_key, unpack(ARGV, first_job_field))
if may_wait ~= '' then redis.call('HSET', job_key, 'eas_expires_at', tostring(now + tonumber(may_wait))) end
redis.call('RPUSH', queue_key, job_id)
redis.call('SADD', queues_set, queue_key)
redis.call('ZADD', open_requests, now, job_id)
if idempotency_key then redis.call('SET', idempotency_key, idempotency_value, 'EX', idempotency_ttl) end
return {'queued'}
