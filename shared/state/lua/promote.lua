-- promote.lua: due retries to the tail of the queue, as their producers' bytes,
-- with their identity left behind. Returns how many moved.
--
-- KEYS[1]  delayed (sorted set of envelopes, scored by due time)
-- KEYS[2]  the shared queue
-- KEYS[3]  the redelivery hash
-- ARGV[1]  now (epoch seconds)
-- ARGV[2]  at most this many

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, envelope in ipairs(due) do
  local task_id, deliveries, _, message = unwrap(envelope)
  if task_id then
    redis.call('RPUSH', KEYS[2], message)
    leave_identity(KEYS[3], KEYS[2], message, task_id .. ':' .. deliveries)
  else
    redis.call('RPUSH', KEYS[2], envelope)
  end
  redis.call('ZREM', KEYS[1], envelope)
end
return #due
