-- Included by claim.lua, record_outcomes.lua and sink_append.lua: redis_scripts.py puts this text in place
-- of their include line (Redis 6.2 has no shared script libraries).
-- Appends the ended request `id` to its service's sink log (index = one more than the last) and queues
-- its webhook if it has a `callback_url` (false: none; callbacks.py). Returns the index, which the caller
-- writes on the job (`eas_sink_index`) with its other fields in one HSET, and the line to publish on the
-- ended channel for waiting clients (notifier.py), which the caller publishes and counts.
local function sink_log_append(service, id, status, callback_url, now_unix, sink_indexes, sink_log_prefix,
                               callback_outbox)
  local index = redis.call('HINCRBY', sink_indexes, service, 1)
  redis.call('XADD', sink_log_prefix .. service, '0-' .. index, 'id', id, 'status', status, 'at', now_unix)
  if callback_url then
    redis.call('RPUSH', callback_outbox, service .. ' ' .. index .. ' ' .. id .. ' ' .. callback_url)
  end
  return index, service .. ' ' .. index .. ' ' .. id
end
