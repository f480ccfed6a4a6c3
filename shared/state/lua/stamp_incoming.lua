-- stamp_incoming.lua: after a BLMOVE put one message into the worker's incoming
-- list, wrap it into its processing list. Returns the worker's view, or false.
--
-- KEYS[1]  the worker's incoming list (producers' bytes)
-- KEYS[2]  the worker's processing list
-- KEYS[3]  the redelivery hash
-- KEYS[4]  the list BLMOVE took the message from
-- ARGV[1]  a fresh task id
-- ARGV[2]  max message bytes handed to the worker
-- ARGV[3]  origin of KEYS[4]: "s" or "h"

local message = redis.call('LPOP', KEYS[1])
if not message then return false end
local envelope, view = wrap(KEYS[3], KEYS[4], ARGV[3], message, ARGV[1], tonumber(ARGV[2]))
redis.call('RPUSH', KEYS[2], envelope)
return view
