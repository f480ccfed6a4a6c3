-- requeue_dead.lua: a dead letter back onto the queue, unless someone else
-- already moved it. Returns 1 if it moved.
--
-- KEYS[1]  dead letters
-- KEYS[2]  the shared queue
-- ARGV[1]  the dead-letter entry
-- ARGV[2]  the message to push (the producer's bytes it holds)

if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
