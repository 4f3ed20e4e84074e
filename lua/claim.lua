-- Claims up to `want` queued requests, strictly in the order of the queues in KEYS, and records each as
-- started (RQ status, StartedJobRegistry entry, Execution) in the same atomic step: no request is ever
-- popped without a trace (the gap of rq issue 1716). A request whose queue deadline passed unstarted ends
-- EXPIRED here, unforwarded (the rule of lifecycle.has_expired). Returns, per claimed request:
-- {queue index, job id, execution id, attempt, {the requested job fields}}: only what forwarding needs.
-- A job hash is read once, with those fields, and written once: 9 commands per claimed request.
local open_requests = KEYS[1]
local worker_executions = KEYS[2]
local metrics = KEYS[3] -- an expiry counts as an ended request there (metrics.py)
local first_queue_key = 4 -- then per queue: list, StartedJobRegistry, CanceledJobRegistry

local want = tonumber(ARGV[1])
local now_unix = ARGV[2]
local now_text = ARGV[3] -- RQ's timestamp format
local heartbeat_deadline = tonumber(ARGV[4])
local heartbeat_ttl = tonumber(ARGV[5])
local worker_name = ARGV[6]
local expired_ttl = tonumber(ARGV[7])
local job_prefix, execution_prefix, executions_registry_prefix = ARGV[8], ARGV[9], ARGV[10]
local sink_indexes, sink_log_prefix, ended_channel = ARGV[11], ARGV[12], ARGV[13]
local callback_outbox = ARGV[14]
local adopted_queue = tonumber(ARGV[15]) -- a request this worker popped with BLPOP (0: none)
local adopted_id = ARGV[16]
local field_count = tonumber(ARGV[17])
local fields = {unpack(ARGV, 18, 17 + field_count)}
local execution_prefix_id = ARGV[18 + field_count] -- 24 random hex digits; each execution adds 8 more
local executions_started = 0

local clock = redis.call('TIME') -- expiry is judged on Redis's clock, as the API and the sink judge it
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local claimed = {}

--!include sink_log_append

-- An expired request ends CANCELED (outcome expired), with its entry in its service's sink log, its
-- notification and its count.
local function expire(job_key, id, canceled_registry)
  local written = {'status', 'canceled', 'eas_outcome', 'expired', 'ended_at', now_text}
  local service, callback_url = unpack(redis.call('HMGET', job_key, 'eas_service', 'eas_callback_url'))
  if service then
    local index, line = sink_log_append(service, id, 'EXPIRED', callback_url, now_unix, sink_indexes,
                                        sink_log_prefix, callback_outbox)
    written[#written + 1] = 'eas_sink_index'
    written[#written + 1] = index
    redis.call('PUBLISH', ended_channel, line)
    redis.call('HINCRBY', metrics, 'ended|' .. service .. '|EXPIRED', 1)
  end
  redis.call('HSET', job_key, unpack(written))
  redis.call('EXPIRE', job_key, expired_ttl)
  redis.call('ZADD', canceled_registry, now + expired_ttl, id)
  redis.call('ZREM', open_requests, id)
end

local function start(job_key, id, started_registry, attempts)
  executions_started = executions_started + 1
  local execution_id = execution_prefix_id .. string.format('%08x', executions_started)
  local composite = id .. ':' .. execution_id
  redis.call('HSET', job_key, 'status', 'started', 'started_at', now_text, 'last_heartbeat', now_text,
             'worker_name', worker_name, 'eas_attempts', attempts)
  redis.call('PERSIST', job_key) -- as RQ does when a job starts (one requeued from failed has a ttl)
  redis.call('ZADD', started_registry, heartbeat_deadline, composite)
  local execution_key = execution_prefix .. composite
  redis.call('HSET', execution_key, 'id', execution_id, 'job_id', id, 'created_at', now_unix,
             'last_heartbeat', now_unix, 'worker_name', worker_name)
  redis.call('EXPIRE', execution_key, heartbeat_ttl)
  -- RQ's ExecutionRegistry keeps an execution 60 s past its heartbeat deadline (Execution.heartbeat).
  redis.call('ZADD', executions_registry_prefix .. id, heartbeat_deadline + 60, execution_id)
  redis.call('EXPIRE', executions_registry_prefix .. id, heartbeat_ttl + 60)
  redis.call('SADD', worker_executions, composite)
  return execution_id
end

local function take(q, id)
  local base = first_queue_key + 3 * (q - 1)
  local started_registry, canceled_registry = KEYS[base + 1], KEYS[base + 2]
  local job_key = job_prefix .. id
  local values = redis.call('HMGET', job_key, 'status', 'eas_expires_at', 'eas_attempts', unpack(fields))
  if values[1] ~= 'queued' then return end -- canceled, deleted or already taken: skip
  local expires_at, attempts = tonumber(values[2]), tonumber(values[3]) or 0
  if expires_at and attempts == 0 and now > expires_at then
    expire(job_key, id, canceled_registry)
    return
  end
  local execution_id = start(job_key, id, started_registry, attempts + 1)
  claimed[#claimed + 1] = {q, id, execution_id, attempts + 1, {unpack(values, 4)}}
end

if adopted_queue > 0 then take(adopted_queue, adopted_id) end
local queue_count = (#KEYS - first_queue_key + 1) / 3
for q = 1, queue_count do
  local queue_key = KEYS[first_queue_key + 3 * (q - 1)]
  while #claimed < want do
    local ids = redis.call('LPOP', queue_key, want - #claimed)
    if not ids then break end
    for _, id in ipairs(ids) do take(q, id) end
  end
end
return claimed
