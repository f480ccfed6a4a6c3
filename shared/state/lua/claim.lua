-- claim.lua: up to `count` messages into a worker's processing list, from the
-- host's own queue and the shared queue in a fixed proportion, and never more
-- than half of those waiting, so that the last tasks of a burst spread over
-- the workers. Returns the worker's view of each envelope.
--
-- Of every `cycle` messages a worker claims (counted over its claims, from
-- `turn` on), the last is taken from the shared queue first and the others
-- from the host's queue first; whichever is empty, the other gives. So while
-- both hold tasks, the host's queue gets (cycle-1)/cycle of the claims and the
-- shared queue 1/cycle: neither can starve the other, whatever the claim sizes.
--
-- KEYS[1]  the shared queue (list, producers')
-- KEYS[2]  the worker's processing list (list of envelopes)
-- KEYS[3]  the host's own queue (list, producers'); KEYS[1] again when there is none
-- KEYS[4]  the redelivery hash
-- ARGV[1]  count
-- ARGV[2]  max message bytes handed to the worker
-- ARGV[3]  turn: how many messages this worker claimed before (its place in the cycle)
-- ARGV[4]  cycle (at least 1)
-- ARGV[5..] one fresh task id per message that may be claimed

local waiting = redis.call('LLEN', KEYS[3])
if KEYS[3] ~= KEYS[1] then waiting = waiting + redis.call('LLEN', KEYS[1]) end
local max_bytes = tonumber(ARGV[2])
local turn, cycle = tonumber(ARGV[3]), tonumber(ARGV[4])
local claimed = {}
for i = 1, math.min(tonumber(ARGV[1]), math.max(1, math.floor(waiting / 2))) do
  local first, first_origin, second, second_origin = KEYS[3], 'h', KEYS[1], 's'
  if KEYS[3] == KEYS[1] then
    first_origin = 's'
  elseif (turn + i) % cycle == 0 then
    first, first_origin, second, second_origin = KEYS[1], 's', KEYS[3], 'h'
  end
  local list, origin = first, first_origin
  local message = redis.call('LPOP', list)
  if not message and KEYS[3] ~= KEYS[1] then
    list, origin = second, second_origin
    message = redis.call('LPOP', list)
  end
  if not message then break end
  local envelope, view = wrap(KEYS[4], list, origin, message, ARGV[4 + i], max_bytes)
  redis.call('RPUSH', KEYS[2], envelope)
  claimed[#claimed + 1] = view
end
return claimed
