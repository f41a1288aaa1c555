-- Charge the real token usage after an answer, on Redis server time.
--
-- KEYS[1..n]  token bucket hashes {t = level, ts = seconds}; KEYS[n+1] the budget counter when ARGV[3] == 1
-- ARGV[1]     n
-- ARGV[2]     tokens used
-- ARGV[3]     1 to add the tokens to the lifetime budget counter
-- ARGV[4..]   per bucket: capacity, refill per second
--
-- A bucket may go into debt here; it refuses until it has refilled.
local n, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
for i = 1, n do
  local cap, rate = tonumber(ARGV[2 * i + 2]), tonumber(ARGV[2 * i + 3])
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  local level = cap
  if state[1] then
    level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  level = level - tokens
  redis.call('HSET', KEYS[i], 't', tostring(level), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1000)
end
if tonumber(ARGV[3]) == 1 then
  return redis.call('INCRBY', KEYS[n + 1], tokens)
end
return 0
