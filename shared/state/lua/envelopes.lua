-- envelopes.lua: functions the scripts that wrap and unwrap messages share.
-- It is prepended to them (shared/state/redis_queue.py, load_script); it touches only
-- the keys its callers pass it, which they took from KEYS.
--
-- The producers' lists (the queue, the host queues) hold only the bytes
-- producers pushed. A message taken from them is wrapped in an envelope in a
-- processing list, which only the pool writes, and goes back byte-identical:
--
--   envelope: "irw2 <task id> <deliveries> <length> <origin>\n<message>"
--
-- origin is "s" (the shared queue) or "h" (the claiming host's own queue); no
-- script takes a key's name from an envelope or a message. A message that
-- goes back leaves its identity in the redelivery hash, field
-- "<list> <sha1 of the message>" -> "<task id>:<deliveries>" (space-separated,
-- one per copy that went back), and takes it up again when it is next claimed
-- from that list: MAX_ATTEMPTS and the ledger's duplicate check see one task
-- across crashes. The envelope holds the whole message, so that it can go back
-- as it came; a worker is handed at most max_bytes of it, and knows from
-- <length> that it was cut.

local function identity_field(list, message)
  return list .. ' ' .. redis.sha1hex(message)
end

-- The identity a message left behind when it went back to `list`, taken up.
local function take_identity(redelivery, list, message)
  local field = identity_field(list, message)
  local held = redis.call('HGET', redelivery, field)
  if not held then return nil end
  local first, rest = string.match(held, '^(%S+) ?(.*)$')
  if rest == '' then redis.call('HDEL', redelivery, field) else redis.call('HSET', redelivery, field, rest) end
  return first
end

local function leave_identity(redelivery, list, message, identity)
  local field = identity_field(list, message)
  local held = redis.call('HGET', redelivery, field)
  redis.call('HSET', redelivery, field, held and (held .. ' ' .. identity) or identity)
end

-- Wrap a message taken from `list`; returns the envelope and the worker's view of it.
local function wrap(redelivery, list, origin, message, fresh_id, max_bytes)
  local task_id, deliveries = fresh_id, 1
  local known = take_identity(redelivery, list, message)
  if known then
    local id, count = string.match(known, '^([%w%-]+):(%d+)$')
    if id then task_id, deliveries = id, tonumber(count) + 1 end
  end
  local header = 'irw2 ' .. task_id .. ' ' .. deliveries .. ' ' .. #message .. ' ' .. origin .. '\n'
  local envelope = header .. message
  if #message <= max_bytes then return envelope, envelope end
  return envelope, header .. string.sub(message, 1, max_bytes)
end

-- An envelope's parts; nil for anything else (a damaged entry).
local function unwrap(envelope)
  return string.match(envelope, '^irw[12] ([%w%-]+) (%d+) %d+ (%S+)\n(.*)$')
end
