-- Appends one ended request to its service's sink log (sink_log_append.lua), publishes it for waiting
-- clients and counts it: used inside the cancel transaction (lifecycle.py). Returns the index (0: no such
-- request).
local job_key = KEYS[1]
local sink_indexes = KEYS[2]
local metrics = KEYS[3] -- the request's end counts there, by outcome (metrics.py)

local id = ARGV[1]
local status = ARGV[2] -- SUCCESS, FAILURE, EXPIRED or CANCELED
local sink_log_prefix, ended_channel = ARGV[3], ARGV[4]
local callback_outbox = ARGV[5]

local clock = redis.call('TIME')
local now_unix = clock[1] .. '.' .. string.format('%06d', tonumber(clock[2]))
--!include sink_log_append

local service, callback_url = unpack(redis.call('HMGET', job_key, 'eas_service', 'eas_callback_url'))
if not service then return 0 end
local index, line = sink_log_append(service, id, status, callback_url, now_unix, sink_indexes, sink_log_prefix,
                                    callback_outbox)
redis.call('HSET', job_key, 'eas_sink_index', index)
redis.call('PUBLISH', ended_channel, line)
redis.call('HINCRBY', metrics, 'ended|' .. service .. '|' .. status, 1)
return index
