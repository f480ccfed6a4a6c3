-- request_count.lua: count a batch's recorded images for their requests. The
-- ledger runs it in the same MULTI/EXEC as ack.lua (one round trip), so an
-- image counts exactly when its task is acknowledged. Counting is by distinct
-- image id and a repeat changes nothing (a failed image that completes later
-- becomes completed), so a redelivered duplicate, which brings its task's
-- acknowledgement again, may bring its count again too. The image that makes
-- `recorded` reach `declared` ends the request (requests.lua). An image of a
-- request that ended less than REQUEST_TTL ago is not counted.
--
-- KEYS[1]  open requests (sorted set: request id as JSON -> when REQUEST_TTL runs out)
-- KEYS[2]  ended requests (sorted set: request id as JSON -> when it ended)
-- KEYS[3]  this host's request records not yet in its requests.json (list)
-- KEYS[4]  the results stream (KEYS[3] again when there is none)
-- KEYS[5..] the hash of each request the images below belong to
-- ARGV[1]  now (epoch seconds)
-- ARGV[2]  now, as a record's timestamp
-- ARGV[3]  REQUEST_TTL (seconds)
-- ARGV[4]  the stream's MAXLEN (0: no stream)
-- ARGV[5]  the images, a JSON array (one argument: cheap to send), each
--   [n (its request's hash is KEYS[4 + n]), request id (as a JSON string),
--    image id (as a JSON string), request_images, 'c' or 'f', the image's
--    entry in the record (a JSON object, as a string), the record id of the
--    request record should this image end the request]
-- Returns the request records it ended.

local now, timestamp, ttl, stream_maxlen = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ended, still_open = {}, {}
for _, image in ipairs(cjson.decode(ARGV[5])) do
  local key, request_id, image_id, declared, outcome, entry, record_id =
    KEYS[4 + image[1]], image[2], image[3], tostring(image[4]), image[5], image[6], image[7]
  local ended_at = redis.call('ZSCORE', KEYS[2], request_id)
  if not ended_at or tonumber(ended_at) <= now - ttl then
    local known = redis.call('HGET', key, image_id)
    if not known then
      local first = redis.call('HGET', key, 'declared')
      if not first then
        redis.call('HSET', key, 'declared', declared, 'request_id', request_id, 'opened', now)
        first = declared
      elseif first ~= declared then
        redis.call('HINCRBY', key, 'mismatched', 1)
      end
      redis.call('HSET', key, image_id, outcome .. entry)
      redis.call('HINCRBY', key, outcome == 'c' and 'completed' or 'failed', 1)
      local recorded = redis.call('HINCRBY', key, 'recorded', 1)
      if recorded >= (tonumber(first) or 0) then
        ended[#ended + 1] = end_request(key, KEYS[1], KEYS[2], KEYS[3], KEYS[4], stream_maxlen, request_id, '', now,
                                        timestamp, record_id, ttl)
        still_open[request_id] = nil
      else
        still_open[request_id] = true
      end
    elseif outcome == 'c' and string.sub(known, 1, 1) == 'f' then
      redis.call('HSET', key, image_id, outcome .. entry)
      redis.call('HINCRBY', key, 'completed', 1)
      redis.call('HINCRBY', key, 'failed', -1)
    end
  end
end
-- Each image recorded puts its request's REQUEST_TTL off: once per request.
for request_id in pairs(still_open) do
  redis.call('ZADD', KEYS[1], now + ttl, request_id)
end
return ended
