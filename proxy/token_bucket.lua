-- One admission decision, atomically, on Redis server time.
--
-- KEYS[1..n]     bucket hashes {t = level, ts = seconds}
-- KEYS[n+1..n+3] with a budget: the spent counter, the holds (a ZSET of "id:tokens"
--                scored by expiry in ms) and the running total they hold
-- ARGV[1]        n, the number of buckets
-- ARGV[2]        lifetime token budget, or -1 for none
-- ARGV[3]        how long a hold lives, ms
-- ARGV[4..3n+3]  per bucket: capacity, refill per second, cost of this request
-- ARGV[3n+4]     with a budget: the tokens this request would hold
-- ARGV[3n+5]     with a budget: an id for its hold, unique across processes
--
-- A bucket refuses when its level is below max(cost, 1), so one in debt
-- refuses even a request that costs it nothing now (tokens are charged after
-- the answer). Either every bucket takes its cost and the budget its hold, or
-- nothing is taken.
--
-- The budget refuses once spent (402), and while all that is left is held by
-- requests in flight (429: a settle may free some). An admitted request holds
-- min(wanted, budget - spent - held). Holds past their expiry were left by a
-- worker that died: they are dropped here, each once, so the cost stays O(1)
-- amortised in the number of holds.
--
-- Returns {verdict, refusing bucket (0 = none), wait ms, tokens held, then per bucket: floor(level), ms until full}
-- verdict: 1 admitted, 0 refused by a bucket (429), -1 budget spent (402), -2 budget held (429).
local n = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local hold = 0
local holds, held_key
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
  if spent >= budget then
    return {-1, 0, 0, 0}
  end
  holds, held_key = KEYS[n + 2], KEYS[n + 3]
  local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now_ms)
  if #expired > 0 then
    local freed = 0
    for _, member in ipairs(expired) do
      freed = freed + tonumber(string.match(member, ':(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', holds, '-inf', now_ms)
    if redis.call('ZCARD', holds) == 0 then
      redis.call('DEL', held_key)
    else
      redis.call('DECRBY', held_key, freed)
    end
  end
  local available = budget - spent - math.max(0, tonumber(redis.call('GET', held_key) or '0'))
  if available <= 0 then
    return {-2, 0, 0, 0}
  end
  hold = math.min(tonumber(ARGV[3 * n + 4]), available)
end

local levels, caps, rates, costs = {}, {}, {}, {}
local worst, worst_wait = 0, 0
for i = 1, n do
  local cap, rate, cost = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  local level = cap
  if state[1] then
    level = math.min(cap, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  levels[i], caps[i], rates[i], costs[i] = level, cap, rate, cost
  local need = math.max(cost, 1)
  if level < need then
    local wait = math.ceil((need - level) / rate * 1000)
    if wait > worst_wait then
      worst, worst_wait = i, wait
    end
  end
end

local verdict = 0
if worst == 0 then
  verdict = 1
  for i = 1, n do
    if costs[i] > 0 then
      local level = levels[i] - costs[i]
      levels[i] = level
      redis.call('HSET', KEYS[i], 't', tostring(level), 'ts', tostring(now))
      redis.call('PEXPIRE', KEYS[i], math.ceil((caps[i] - level) / rates[i] * 1000) + 1000)
    end
  end
  if hold > 0 then
    redis.call('ZADD', holds, now_ms + tonumber(ARGV[3]), ARGV[3 * n + 5] .. ':' .. hold)
    redis.call('INCRBY', held_key, hold)
    -- Both keys go a second after the last hold would expire: an idle budget leaves only its counter.
    local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
    local gone = math.floor(tonumber(last[2])) + 1000
    redis.call('PEXPIREAT', holds, gone)
    redis.call('PEXPIREAT', held_key, gone)
  end
else
  hold = 0
end

local out = {verdict, worst, worst_wait, hold}
for i = 1, n do
  out[#out + 1] = math.floor(levels[i])
  out[#out + 1] = math.ceil((caps[i] - levels[i]) / rates[i] * 1000)
end
return out
