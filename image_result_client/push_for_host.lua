-- push_for_host.lua: a producer's shared-memory task that also has a URL, onto
-- its host's queue while a pool serves that host, else onto the shared queue as
-- a URL task. In one script, so the live key cannot expire between the look and
-- the push. The one script a producer runs. Returns 1 for the host's queue, 0
-- for the shared queue.
--
-- KEYS[1]  the host's live key (string, renewed by a supervisor serving the host)
-- KEYS[2]  the host's queue
-- KEYS[3]  the shared queue
-- ARGV[1]  the message
-- ARGV[2]  the message without shm_info

if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
redis.call('RPUSH', KEYS[3], ARGV[2])
return 0
