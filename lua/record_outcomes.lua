-- Records a batch of outcomes, each as RQ's worker records it: status and end time; the registry it moves
-- to (Finished, Failed, or Scheduled to wait for a retry); a Result stream entry (success or failure); the
-- job's and result's expiry; the Execution removed; plus our open-requests index. One call instead of
-- RQ's ten pipelined commands per request, and atomic, which RQ's Job.retry is not (it writes the status
-- first). Only the worker that still holds a request (its StartedJobRegistry entry) may record it: if its
-- heartbeat lapsed, recovery has retried or failed the request, and a late outcome must not undo that.
-- Each recorded outcome also counts in the metrics hash (metrics.py): its attempt by the model's status
-- code, the attempt's duration bucket, a retry, and the request's end by outcome. The counts of a batch
-- are added up first and the ended requests published in one message (a line each), so a batch costs a
-- few commands and one wake-up of each API process instead of several per request. (Should a command
-- fail half-way, as an OOM can make one, the requests recorded before it keep their records but not their
-- counts or notification: a waiting client then answers at its `_timeout_`.)
-- Returns how many outcomes came too late (their request was no longer this worker's).
local open_requests = KEYS[1]
local worker_executions = KEYS[2]
local worker_key = KEYS[3]
local metrics = KEYS[4]

local now_text = ARGV[1] -- RQ's timestamp format
local job_prefix, results_prefix = ARGV[2], ARGV[3]
local execution_prefix, executions_registry_prefix = ARGV[4], ARGV[5]
local finished_job_data = ARGV[6] -- the `data` a finished request keeps: its function, not the request
local now_unix = ARGV[7]
local sink_indexes, sink_log_prefix, ended_channel = ARGV[8], ARGV[9], ARGV[10]
local callback_outbox = ARGV[11]
local first_record = 12 -- then per request: 10 values, then its result field/value pairs

local counts, sums, ended = {}, {}, {} -- the batch's metrics and its ended requests' notification lines
local function count(field, by) counts[field] = (counts[field] or 0) + by end

--!include sink_log_append

-- An ended request's entry in its service's sink log (its index goes on the job with the other fields);
-- its notification line and count wait for the end of the batch.
local function append_to_sink_log(written, service, id, status, callback_url)
  local index, line = sink_log_append(service, id, status, callback_url, now_unix, sink_indexes,
                                      sink_log_prefix, callback_outbox)
  written[#written + 1] = 'eas_sink_index'
  written[#written + 1] = index
  ended[#ended + 1] = line
  count('ended|' .. service .. '|' .. status, 1)
end

-- The attempt behind an outcome: its model status code ('none': no answer), duration and histogram bucket.
local function count_attempt(service, status, code, seconds, bucket)
  count('forwards|' .. service .. '|' .. code, 1)
  count('forward_le|' .. service .. '|' .. bucket, 1)
  sums['forward_sum|' .. service] = (sums['forward_sum|' .. service] or 0) + tonumber(seconds)
  if status == 'scheduled' then count('retries|' .. service, 1) end
end

-- A finished request drops its body, and the fields that matter only while it may run again: nothing
-- runs it again (RQ requeues failed jobs only), and the body is most of what it would keep for
-- `result_ttl`. The hash is written afresh, so that Redis stores the now-small hash as a listpack: 472 B
-- instead of 1,555 B (MEMORY USAGE, Redis 7.0). Job.fetch and the dashboard read what is left.
local dropped_when_finished = {eas_last_error = true, last_heartbeat = true, retry_intervals = true,
  retries_left = true, enqueue_at_front_on_retry = true, timeout = true, failure_ttl = true}

-- The fields a finished request keeps: `fields` (HGETALL's name/value pairs) less the dropped ones,
-- with the `written` pairs in place of their old values.
local function shrunk(fields, written)
  local kept, overwritten = {}, {}
  for f = 1, #written, 2 do overwritten[written[f]] = true end
  for f = 1, #fields, 2 do
    local name, value = fields[f], fields[f + 1]
    if name == 'data' then value = finished_job_data end
    if not dropped_when_finished[name] and not overwritten[name] then
      kept[#kept + 1] = name
      kept[#kept + 1] = value
    end
  end
  for f = 1, #written do kept[#kept + 1] = written[f] end
  return kept
end

-- HGETALL's name/value pairs by name.
local function by_name(fields)
  local named = {}
  for f = 1, #fields, 2 do named[fields[f]] = fields[f + 1] end
  return named
end

-- The job hash of a recorded request is read once and written once: for a success, read whole (it is
-- rewritten small) and written afresh; otherwise its service and callback read, the new fields written.
-- A success costs 14 commands.
local function record_job(job_key, id, status, last_error, retries_left, code, seconds, bucket)
  local written = {'status', status, 'ended_at', now_text}
  if last_error ~= '' then
    written[#written + 1] = 'eas_last_error'
    written[#written + 1] = last_error
  end
  if retries_left ~= '' then
    written[#written + 1] = 'retries_left'
    written[#written + 1] = retries_left
  end
  local fields, service, callback_url
  if status == 'finished' then
    fields = redis.call('HGETALL', job_key)
    local named = by_name(fields)
    service, callback_url = named['eas_service'], named['eas_callback_url']
  else
    service, callback_url = unpack(redis.call('HMGET', job_key, 'eas_service', 'eas_callback_url'))
  end
  -- A request has a service; another job (a webhook delivery) is recorded as RQ would, and no more.
  if service then
    count_attempt(service, status, code, seconds, bucket)
    if status == 'finished' then
      append_to_sink_log(written, service, id, 'SUCCESS', callback_url)
      redis.call('DEL', job_key)
      redis.call('HSET', job_key, unpack(shrunk(fields, written)))
      return
    elseif status == 'failed' then
      append_to_sink_log(written, service, id, 'FAILURE', callback_url)
    end
  end
  redis.call('HSET', job_key, unpack(written))
end

local finished, failed, stale = 0, 0, 0
local i = first_record
while i <= #ARGV do
  local status = ARGV[i] -- finished, scheduled or failed
  local id, execution_id = ARGV[i + 1], ARGV[i + 2]
  local started_registry, next_registry, next_score = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local ttl = tonumber(ARGV[i + 6]) -- of job and result; 0: keep
  local last_error = ARGV[i + 7] -- '': none
  local retries_left = ARGV[i + 8] -- '': unchanged
  local result_field_count = tonumber(ARGV[i + 9])
  -- 3 more values for the metrics: model status code, attempt seconds, histogram bucket; then the pairs
  local code, seconds, bucket = ARGV[i + 10], ARGV[i + 11], ARGV[i + 12]
  local first_result_field = i + 13
  local composite = id .. ':' .. execution_id
  if redis.call('ZREM', started_registry, composite) == 1 then
    local job_key = job_prefix .. id
    record_job(job_key, id, status, last_error, retries_left, code, seconds, bucket)
    redis.call('ZADD', next_registry, next_score, id)
    if result_field_count > 0 then
      local results = results_prefix .. id
      redis.call('XADD', results, 'MAXLEN', 10, '*',
                 unpack(ARGV, first_result_field, first_result_field - 1 + 2 * result_field_count))
      redis.call('EXPIRE', results, ttl)
    end
    if ttl > 0 then redis.call('EXPIRE', job_key, ttl) end
    if status ~= 'scheduled' then redis.call('ZREM', open_requests, id) end
    if status == 'finished' then finished = finished + 1 else failed = failed + 1 end
  else
    stale = stale + 1
  end
  redis.call('DEL', execution_prefix .. composite)
  redis.call('ZREM', executions_registry_prefix .. id, execution_id)
  redis.call('SREM', worker_executions, composite)
  i = first_result_field + 2 * result_field_count
end
redis.call('HINCRBY', worker_key, 'successful_job_count', finished)
redis.call('HINCRBY', worker_key, 'failed_job_count', failed)
for field, by in pairs(counts) do redis.call('HINCRBY', metrics, field, by) end
for field, by in pairs(sums) do redis.call('HINCRBYFLOAT', metrics, field, by) end
if #ended > 0 then redis.call('PUBLISH', ended_channel, table.concat(ended, '\n')) end
return stale
