-- Moves retries whose wait is over from RQ's ScheduledJobRegistry back onto their queue, atomically, so a
-- request canceled meanwhile (status no longer `scheduled`) is never queued again. Returns how many moved.
local now = ARGV[1] -- unix seconds
local job_prefix = ARGV[2]
-- KEYS: per queue, its ScheduledJobRegistry then its list

local moved = 0
for q = 1, #KEYS / 2 do
  local registry, queue_key = KEYS[2 * q - 1], KEYS[2 * q]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', registry, '-inf', now, 'LIMIT', 0, 1000)) do
    local job_key = job_prefix .. id
    if redis.call('HGET', job_key, 'status') == 'scheduled' then
      redis.call('HSET', job_key, 'status', 'queued')
      if redis.call('HGET', job_key, 'enqueue_at_front_on_retry') == '1' then
        redis.call('LPUSH', queue_key, id)
      else
        redis.call('RPUSH', queue_key, id)
      end
      moved = moved + 1
    end
    redis.call('ZREM', registry, id)
  end
end
return moved
