-- requeue.lua: every task of a processing list back to the head of the list it
-- came from, in the order it was claimed, as the bytes its producer pushed; its
-- identity stays behind in the redelivery hash. A dead host's URL tasks so
-- return to the shared queue for any host, its shared-memory tasks to its own
-- queue, to wait for it. The last ARGV[1] envelopes were claimed but never
-- started (a worker claims several at a time): their delivery count goes back
-- down, so that a task that kills its worker does not use up the attempts of
-- the tasks claimed with it. A task whose record a ledger was committing goes
-- to the list's host queue instead: the record may be on that host's disk,
-- and only that host's ledger can tell, and drop the task as a duplicate. A
-- message BLMOVE brought in but the worker never wrapped (it died or was
-- stopped between the two calls) goes back to the list it came from.
-- Returns how many messages moved.
--
-- KEYS[1]  the processing list
-- KEYS[2]  the shared queue
-- KEYS[3]  the registry (set of processing lists)
-- KEYS[4]  committing (hash: task id -> host queue)
-- KEYS[5]  wait sources (hash: processing list -> "<wait source> <host queue>")
-- KEYS[6]  the worker's incoming list
-- KEYS[7]  the list's host queue (as register() wrote it down)
-- KEYS[8]  the list the worker's blocking wait takes from
-- KEYS[9]  the redelivery hash
-- ARGV[1]  how many at the end of the list were never started

local moved, unstarted = 0, tonumber(ARGV[1])
while true do
  local envelope = redis.call('RPOP', KEYS[1])
  if not envelope then break end
  local task_id, deliveries, origin, message = unwrap(envelope)
  if task_id then
    deliveries = tonumber(deliveries)
    if moved < unstarted then deliveries = math.max(0, deliveries - 1) end
    local list = KEYS[2]
    -- An envelope of version 1 named its origin list; "h" is the host's queue.
    if origin == 'h' or origin == KEYS[7] or redis.call('HEXISTS', KEYS[4], task_id) == 1 then
      list = KEYS[7]
    end
    redis.call('LPUSH', list, message)
    leave_identity(KEYS[9], list, message, task_id .. ':' .. deliveries)
  else
    redis.call('LPUSH', KEYS[2], envelope)  -- not an envelope: nothing to unwrap, nothing lost
  end
  moved = moved + 1
end
while true do
  local message = redis.call('RPOP', KEYS[6])
  if not message then break end
  redis.call('LPUSH', KEYS[8], message)
  moved = moved + 1
end
redis.call('SREM', KEYS[3], KEYS[1])
redis.call('HDEL', KEYS[5], KEYS[1])
return moved
