-- Settle one answer, on Redis server time: charge its real usage and release its holds, once.
--
-- KEYS[1..n]          token bucket hashes {t = level, ts = seconds}
-- KEYS[n+1]           the key's spent tokens, a counter
-- KEYS[n+2], KEYS[n+3] the key's and its group's spent money in micro-units: hashes
--                     {total = lifetime, month = this month's, period = "YYYY-MM" that month}
-- KEYS[n+2+2b..n+3+2b] per budget b: its holds ZSET and their running total
-- KEYS[n+4+2m]        with budgets: the ids settled lately, a ZSET scored by when each is forgotten (ms)
-- ARGV[1], ARGV[2]    n, and m the number of budgets
-- ARGV[3]             seconds added to the clock for budget periods (tests only; else 0)
-- ARGV[4]             how long a settled id is remembered, ms
-- ARGV[5..2n+4]       per bucket: capacity, refill per second
-- ARGV[2n+5]          tokens used (0 when nothing was billed)
-- ARGV[2n+6]          their cost in micro-units (0 when nothing was billed or no price is known)
-- ARGV[2n+7]          the holds' id, or ""
-- ARGV[2n+8..2n+7+m]  per budget: the amount held, "0" for none, "?" when admission's answer was lost
--
-- Spending is counted for every key, with or without a budget. A bucket may go
-- into debt here; it refuses until it has refilled. The real usage is spent
-- whatever was held: the part of it over a hold is charged, the unused part of
-- the hold is released. A hold dropped at its expiry was taken off the running
-- total then, so it is not taken off twice. A month's spend starts again from
-- nothing once the clock is in a later month than the one stored with it: the
-- renewal is this atomic reset, whichever process gets there first.
--
-- With an id, a settle counts once: the id is remembered, and a settle sent again (its first
-- answer was lost in a Redis stall, so the gateway cannot know whether it ran) does nothing.
-- An admission that arrives after its settle finds the id here and takes nothing (token_bucket.lua).
-- Returns 0, or 1 for a settle that had already run.
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(ARGV[2 * n + 5])
local micros = tonumber(ARGV[2 * n + 6])
local id = ARGV[2 * n + 7]
local settled = nil
if id ~= '' then
  settled = KEYS[n + 4 + 2 * m]
  if redis.call('ZSCORE', settled, id) then
    return 1
  end
end
local clock = redis.call('TIME')

-- month_of(seconds): from month.lua, which limits.py puts in front of this script.

if tokens > 0 then
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  for i = 1, n do
    local cap, rate = tonumber(ARGV[2 * i + 3]), tonumber(ARGV[2 * i + 4])
    local state = redis.call('HMGET', KEYS[i], 't', 'ts')
    local level = cap
    if state[1] then
      level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
    end
    level = level - tokens
    redis.call('HSET', KEYS[i], 't', tostring(level), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1000)
  end
  redis.call('INCRBY', KEYS[n + 1], tokens)
end
if micros > 0 then
  local period = month_of(tonumber(clock[1]) + tonumber(ARGV[3]))
  for _, money in ipairs({KEYS[n + 2], KEYS[n + 3]}) do
    local stored = redis.call('HGET', money, 'period')
    if stored and stored >= period then
      -- A clock behind the one that stored the period still spends in that period.
      redis.call('HINCRBY', money, 'month', micros)
    else
      redis.call('HSET', money, 'month', micros, 'period', period)
    end
    redis.call('HINCRBY', money, 'total', micros)
  end
end

if id == '' then
  return 0
end
for b = 1, m do
  local holds, held_key = KEYS[n + 2 + 2 * b], KEYS[n + 3 + 2 * b]
  local amount = ARGV[2 * n + 7 + b]
  local member = ''
  if amount == '?' then
    -- Admission's answer never came back (a timeout, a client gone): its hold, if the
    -- script ran at all, is found by id. Rare, so a scan of the holds is fine.
    local pattern = id .. ':*'
    local cursor = '0'
    repeat
      local page = redis.call('ZSCAN', holds, cursor, 'MATCH', pattern, 'COUNT', 1000)
      cursor = page[1]
      if #page[2] > 0 then
        member = page[2][1]
      end
    until cursor == '0' or member ~= ''
  elseif amount ~= '0' then
    member = id .. ':' .. amount
  end
  if member ~= '' and redis.call('ZREM', holds, member) == 1 then
    if redis.call('ZCARD', holds) == 0 then
      redis.call('DEL', held_key)
    else
      redis.call('DECRBY', held_key, tonumber(string.match(member, ':(%d+)$')))
    end
  end
end
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local remember = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', settled, '-inf', now_ms)
redis.call('ZADD', settled, now_ms + remember, id)
redis.call('PEXPIRE', settled, remember + 1000)
return 0
