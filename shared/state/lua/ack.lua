-- ack.lua: acknowledge a batch of tasks in one atomic step. Per task, its kind:
-- "final" (its record is durable: announce it), "junk" (as final, for a
-- message with no request id: not JSON, not an object, or without one; its
-- dead letter goes to the junk list, capped apart, so that a flood of junk
-- cannot push out the dead letters of real tasks), "retry"
-- (into the delayed set), "ack" (only leave the processing list). A task's outcome is announced (its
-- dead letter pushed, its completion event added to the stream) once per task
-- id, whichever delivery gets here: a ledger killed with acknowledgements
-- pending leaves the task to be redelivered, and its duplicate then brings the
-- announcement. A retry is scheduled only by the delivery that still held the
-- task, so a requeued task is not also retried.
--
-- KEYS[1]  dead letters (list)
-- KEYS[2]  announced (sorted set of task ids)
-- KEYS[3]  delayed (sorted set)
-- KEYS[4]  this 10 s stats bucket (hash)
-- KEYS[5]  the results stream (KEYS[1] again when there is no stream)
-- KEYS[6]  committing (hash)
-- KEYS[7]  junk messages' dead letters (list)
-- KEYS[8]  dead letters trimmed by the caps, ever (hash: failed, junk)
-- KEYS[9..] one processing list per task, in the order of the tasks below
-- ARGV[1]  dead letters kept, in each of the two lists
-- ARGV[2]  now (epoch seconds)
-- ARGV[3], ARGV[4], ARGV[5]  the batch's completed, failed and retried counts
-- ARGV[6]  the stream's MAXLEN (0: no stream)
-- ARGV[7]  announced ids kept
-- ARGV[8]  of the batch's failed, how many expired (their deadline passed)
-- then six per task, task n at ARGV[9 + 6 * (n - 1)]:
--   envelope (as the worker holds it), kind, dead letter ('' for none),
--   retry time, task id, results-stream event

-- A worker holds a message cut at max_bytes as its envelope's header and the
-- first max_bytes: that envelope is found by its header, which is unique.
local function remove(list, envelope)
  local removed = redis.call('LREM', list, 1, envelope)
  if removed == 1 then return 1 end
  local header, length = string.match(envelope, '^(irw2 [%w%-]+ %d+ (%d+) %S+\n)')
  if header and #envelope - #header < tonumber(length) then
    for _, entry in ipairs(redis.call('LRANGE', list, 0, -1)) do
      if string.sub(entry, 1, #header) == header then return redis.call('LREM', list, 1, entry) end
    end
  end
  return 0
end

local dead_max, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local stream_maxlen, keep_ids = tonumber(ARGV[6]), tonumber(ARGV[7])
local pushed = {}  -- dead-letter list -> its field in KEYS[8]
local announced = false
for i = 9, #KEYS do
  local at = 9 + (i - 9) * 6
  local envelope, kind, dead_letter, retry_at, task_id, event =
    ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5]
  local removed = remove(KEYS[i], envelope)
  redis.call('HDEL', KEYS[6], task_id)
  if kind == 'final' or kind == 'junk' then
    if redis.call('ZADD', KEYS[2], 'NX', now, task_id) == 1 then
      announced = true
      if dead_letter ~= '' then
        local list = kind == 'junk' and 7 or 1
        redis.call('RPUSH', KEYS[list], dead_letter)
        pushed[list] = kind == 'junk' and 'junk' or 'failed'
      end
      if stream_maxlen > 0 then
        redis.call('XADD', KEYS[5], 'MAXLEN', '~', stream_maxlen, '*', 'record', event)
      end
    end
  elseif kind == 'retry' and removed == 1 then
    redis.call('ZADD', KEYS[3], tonumber(retry_at), envelope)
  end
end
local trimmed = {0, 0}
for list, field in pairs(pushed) do
  local over = redis.call('LLEN', KEYS[list]) - dead_max
  if over > 0 then
    redis.call('LTRIM', KEYS[list], -dead_max, -1)
    redis.call('HINCRBY', KEYS[8], field, over)
    trimmed[list == 1 and 1 or 2] = over
  end
end
if announced then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(keep_ids + 1))
end
redis.call('HINCRBY', KEYS[4], 'completed', ARGV[3])
redis.call('HINCRBY', KEYS[4], 'failed', ARGV[4])
redis.call('HINCRBY', KEYS[4], 'retried', ARGV[5])
if tonumber(ARGV[8]) > 0 then redis.call('HINCRBY', KEYS[4], 'expired', ARGV[8]) end
redis.call('EXPIRE', KEYS[4], 120)
return trimmed
