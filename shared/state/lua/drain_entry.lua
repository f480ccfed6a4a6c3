-- drain_entry.lua: one entry of a lost host's queue on to where it can still
-- end, unless the host (or another drain) took it meanwhile. The identity it
-- left behind goes with it to the shared queue (under its new bytes), and its
-- committing mark is dropped. Returns 1 if it moved.
--
-- KEYS[1]  the lost host's queue
-- KEYS[2]  where it goes: the shared queue or the dead letters
-- KEYS[3]  committing (hash)
-- KEYS[4]  the redelivery hash
-- ARGV[1]  the entry
-- ARGV[2]  what to push
-- ARGV[3]  entries KEYS[2] keeps (0: no limit)
-- ARGV[4]  "1" when KEYS[2] is a queue (not the dead letters)

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
local known = take_identity(KEYS[4], KEYS[1], ARGV[1])
if known then
  redis.call('HDEL', KEYS[3], string.match(known, '^[^:]*'))
  if ARGV[4] == '1' then leave_identity(KEYS[4], KEYS[2], ARGV[2], known) end
end
if tonumber(ARGV[3]) > 0 then redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1) end
return 1
