-- request_expire.lua: end the requests whose REQUEST_TTL ran out (no image of
-- theirs recorded for that long) with status "incomplete". A supervisor's
-- upkeep runs it; the check and the end are one step, so when two hosts look
-- at the same request at once, one ends it and the other finds nothing.
--
-- KEYS[1..4] as in request_count.lua (KEYS[3]: the list of the host running this)
-- KEYS[5..] the hash of each request below, in order
-- ARGV[1..4] as in request_count.lua
-- then two per request, request n at ARGV[5 + 2 * (n - 1)]:
--   request id (JSON string), the record id of its request record
-- Returns the request records it ended.

local now, timestamp, ttl, stream_maxlen = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ended = {}
for i = 5, #KEYS do
  local at = 5 + (i - 5) * 2
  local request_id, record_id = ARGV[at], ARGV[at + 1]
  local due = redis.call('ZSCORE', KEYS[1], request_id)
  if due and tonumber(due) <= now then
    if redis.call('EXISTS', KEYS[i]) == 1 then
      ended[#ended + 1] = end_request(KEYS[i], KEYS[1], KEYS[2], KEYS[3], KEYS[4], stream_maxlen, request_id,
                                      'incomplete', now, timestamp, record_id, ttl)
    else
      redis.call('ZREM', KEYS[1], request_id)
    end
  end
end
return ended
