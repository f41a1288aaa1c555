-- Settle one answer, on Redis server time: charge its real usage and release its hold.
--
-- KEYS[1..n]     token bucket hashes {t = level, ts = seconds}
-- KEYS[n+1..n+3] with a budget: the spent counter, the holds ZSET and their running total
-- ARGV[1]        n
-- ARGV[2]        1 when the key has a budget
-- ARGV[3..2n+2]  per bucket: capacity, refill per second
-- ARGV[2n+3]     tokens used (0 when nothing was billed)
-- ARGV[2n+4]     the hold's member "id:tokens", "id:?" when admission's answer was lost, or ""
--
-- A bucket may go into debt here; it refuses until it has refilled. The real
-- usage goes to the spent counter whatever was held: the part of it over the
-- hold is charged, the unused part of the hold is released. A hold dropped at its
-- expiry was taken off the running total then, so it is not taken off twice.
local n = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2 * n + 3])
if tokens > 0 then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  for i = 1, n do
    local cap, rate = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
    local state = redis.call('HMGET', KEYS[i], 't', 'ts')
    local level = cap
    if state[1] then
      level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
    end
    level = level - tokens
    redis.call('HSET', KEYS[i], 't', tostring(level), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1000)
  end
end
if tonumber(ARGV[2]) ~= 1 then
  return 0
end
local member = ARGV[2 * n + 4]
if string.sub(member, -2) == ':?' then
  -- Admission's answer never came back (a timeout, a client gone): its hold, if the
  -- script ran at all, is found by id. Rare, so a scan of the holds is fine.
  local pattern = string.sub(member, 1, -2) .. '*'
  member = ''
  local cursor = '0'
  repeat
    local page = redis.call('ZSCAN', KEYS[n + 2], cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = page[1]
    if #page[2] > 0 then
      member = page[2][1]
    end
  until cursor == '0' or member ~= ''
end
if member ~= '' and redis.call('ZREM', KEYS[n + 2], member) == 1 then
  if redis.call('ZCARD', KEYS[n + 2]) == 0 then
    redis.call('DEL', KEYS[n + 3])
  else
    redis.call('DECRBY', KEYS[n + 3], tonumber(string.match(member, ':(%d+)$')))
  end
end
if tokens > 0 then
  return redis.call('INCRBY', KEYS[n + 1], tokens)
end
return 0
