-- claim.lua: up to `count` messages into a worker's processing list, the host's
-- own queue first, and never more than half of those waiting, so that the last
-- tasks of a burst spread over the workers. Returns the worker's view of each
-- envelope.
--
-- KEYS[1]  the shared queue (list, producers')
-- KEYS[2]  the worker's processing list (list of envelopes)
-- KEYS[3]  the host's own queue (list, producers'); KEYS[1] again when there is none
-- KEYS[4]  the redelivery hash
-- ARGV[1]  count
-- ARGV[2]  max message bytes handed to the worker
-- ARGV[3..] one fresh task id per message that may be claimed

local waiting = redis.call('LLEN', KEYS[3])
if KEYS[3] ~= KEYS[1] then waiting = waiting + redis.call('LLEN', KEYS[1]) end
local max_bytes = tonumber(ARGV[2])
local claimed = {}
for i = 1, math.min(tonumber(ARGV[1]), math.max(1, math.floor(waiting / 2))) do
  local list, origin = KEYS[3], 'h'
  if KEYS[3] == KEYS[1] then origin = 's' end
  local message = redis.call('LPOP', list)
  if not message and KEYS[3] ~= KEYS[1] then
    list, origin = KEYS[1], 's'
    message = redis.call('LPOP', list)
  end
  if not message then break end
  local envelope, view = wrap(KEYS[4], list, origin, message, ARGV[2 + i], max_bytes)
  redis.call('RPUSH', KEYS[2], envelope)
  claimed[#claimed + 1] = view
end
return claimed
