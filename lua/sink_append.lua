-- Appends one ended request to its service's sink log: used inside the cancel transaction (lifecycle.py).
-- The same steps as in claim.lua (and record_outcomes.lua, which counts and notifies once per batch): the
-- entry (index = one more than the last), its index on the job, and a notification for waiting clients. Returns the index (0: no such request).
local job_key = KEYS[1]
local sink_indexes = KEYS[2]
local metrics = KEYS[3] -- the request's end counts there, by outcome (metrics.py)

local id = ARGV[1]
local status = ARGV[2] -- SUCCESS, FAILURE, EXPIRED or CANCELED
local sink_log_prefix, ended_channel = ARGV[3], ARGV[4]
local callback_outbox = ARGV[5]

local clock = redis.call('TIME')
local now_unix = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
local service = redis.call('HGET', job_key, 'eas_service')
if not service then return 0 end
local index = redis.call('HINCRBY', sink_indexes, service, 1)
redis.call('XADD', sink_log_prefix .. service, '0-' .. index, 'id', id, 'status', status, 'at', now_unix)
redis.call('HSET', job_key, 'eas_sink_index', index)
redis.call('PUBLISH', ended_channel, service .. ' ' .. index .. ' ' .. id)
local callback_url = redis.call('HGET', job_key, 'eas_callback_url') -- its webhook's outbox (callbacks.py)
if callback_url then
  redis.call('RPUSH', callback_outbox, service .. ' ' .. index .. ' ' .. id .. ' ' .. callback_url)
end
redis.call('HINCRBY', metrics, 'ended|' .. service .. '|' .. status, 1)
return index
