-- requests.lua: what request_count.lua and request_expire.lua share (it is
-- put in front of each): ending a request, once. Their headers name the keys.
--
-- One open request is a hash, {Q}:request:<request id>:
--   request_id   the request id as a JSON string (ASCII)
--   declared     its request_images, as the first of its images recorded gave it
--   recorded, completed, failed   counts of its distinct images
--   mismatched   images whose message gave another request_images
--   opened       when its first image was recorded (epoch seconds)
--   "<image id>" one per distinct image (the image id as a JSON string, so
--                the only fields that start with '"'): 'c' (completed) or 'f'
--                (failed), then the image's entry in the record (a JSON object)
--
-- Ending it, in one step: the request record goes onto the results stream
-- (field "request", never "record") and onto the list of records the host
-- that ended it still has to write to its requests.json; the hash goes, and the
-- request id is kept in the ended set for REQUEST_TTL, so that a late or
-- redelivered image of it starts nothing new.

local function end_request(key, open, ended, unwritten, stream, stream_maxlen, request_id, status, now, timestamp,
                           record_id, ttl)
  local fields = redis.call('HGETALL', key)
  local meta, images = {}, {}
  for i = 1, #fields, 2 do
    if string.byte(fields[i], 1) == 34 then
      images[#images + 1] = {fields[i], fields[i + 1]}
    else
      meta[fields[i]] = fields[i + 1]
    end
  end
  table.sort(images, function(a, b) return a[1] < b[1] end)
  local entries = {}
  for i, image in ipairs(images) do entries[i] = string.sub(image[2], 2) end
  local completed, failed = tonumber(meta.completed or '0') or 0, tonumber(meta.failed or '0') or 0
  if status == '' then
    if failed == 0 then status = 'completed' elseif completed == 0 then status = 'failed' else status = 'partial' end
  end
  local record = '{"timestamp": "' .. timestamp .. '", "request_id": ' .. request_id .. ', "status": "' .. status ..
    '", "images": ' .. #images .. ', "completed": ' .. completed .. ', "failed": ' .. failed ..
    ', "request_images": ' .. (tonumber(meta.declared or '') or 'null') ..
    ', "mismatched_declarations": ' .. (tonumber(meta.mismatched or '0') or 0) ..
    ', "record_id": "' .. record_id .. '", "image_results": [' .. table.concat(entries, ', ') .. ']}'
  if stream_maxlen > 0 then
    redis.call('XADD', stream, 'MAXLEN', '~', stream_maxlen, '*', 'request', record)
  end
  redis.call('RPUSH', unwritten, record)
  redis.call('DEL', key)
  redis.call('ZREM', open, request_id)
  redis.call('ZADD', ended, now, request_id)
  redis.call('ZREMRANGEBYSCORE', ended, '-inf', now - ttl)
  return record
end
