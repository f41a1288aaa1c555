-- One admission decision, atomically, on Redis server time.
--
-- KEYS[1..n]          bucket hashes {t = level, ts = seconds}
-- KEYS[n+3b-2..n+3b]  per budget b: what is spent (a counter, or a money hash {total, month, period}),
--                     its holds (a ZSET of "id:amount" scored by expiry in ms) and the running total they hold
-- KEYS[n+3m+1]        with budgets: the key's settled hold ids (charge.lua)
-- ARGV[1], ARGV[2]    n, the number of buckets; m, the number of budgets
-- ARGV[3]             how long a hold lives, ms
-- ARGV[4]             seconds added to the clock for budget periods (tests only; else 0)
-- ARGV[5..3n+4]       per bucket: capacity, refill per second, cost of this request
-- ARGV[3n+5..3n+4+2m] per budget: its amount, and what of its spent key counts: "" the counter,
--                     "total" (lifetime) or "month" (this calendar month, UTC) of a money hash
-- then m amounts      per budget: what this request would hold
-- then                with budgets: an id for its holds, unique across processes
--
-- A bucket refuses when its level is below max(cost, 1), so one in debt
-- refuses even a request that costs it nothing now (tokens are charged after
-- the answer). Either every bucket takes its cost and every budget its hold, or
-- nothing is taken.
--
-- A budget refuses once spent (402), and while all that is left is held by
-- requests in flight (429: a settle may free some). An admitted request holds
-- what it wants of each, or, when that is more than is left and nothing else is
-- held, all that is left (else 429 as well). Holds past their expiry were left
-- by a worker that died: they are dropped here, each once, so the cost stays
-- O(1) amortised in the number of holds. A month's spend counts only while its
-- period is the current one: a new month starts from nothing (charge.lua resets it).
--
-- An admission whose request has already been settled (the gateway gave up waiting for it in a
-- Redis stall, and released its hold by id before this arrived) takes nothing: no phantom hold.
--
-- Returns {verdict, refusing bucket or budget (0 = none), wait ms, per budget: the amount held,
--          then per bucket: floor(level), ms until full}
-- verdict: 1 admitted, 0 refused by a bucket (429), -1 budget spent (402), -2 budget held (429),
--          -3 settled already (nobody waits for this answer).
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
if m > 0 and redis.call('ZSCORE', KEYS[n + 3 * m + 1], ARGV[3 * n + 3 * m + 5]) then
  return {-3, 0, 0}
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- month_of(seconds): from month.lua, which limits.py puts in front of this script.

local held = {}
if m > 0 then
  local base_k, base_a = n, 3 * n + 4
  local period = nil
  local spent = {}
  for b = 1, m do
    local key, field = KEYS[base_k + 3 * b - 2], ARGV[base_a + 2 * b]
    if field == '' then
      spent[b] = tonumber(redis.call('GET', key) or '0')
    elseif field == 'total' then
      spent[b] = tonumber(redis.call('HGET', key, 'total') or '0')
    else
      period = period or month_of(tonumber(clock[1]) + tonumber(ARGV[4]))
      local got = redis.call('HMGET', key, 'month', 'period')
      spent[b] = (got[2] and got[2] >= period) and tonumber(got[1] or '0') or 0
    end
    if spent[b] >= tonumber(ARGV[base_a + 2 * b - 1]) then
      return {-1, b, 0}
    end
  end
  for b = 1, m do
    local holds, held_key = KEYS[base_k + 3 * b - 1], KEYS[base_k + 3 * b]
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
    local in_flight = math.max(0, tonumber(redis.call('GET', held_key) or '0'))
    local available = tonumber(ARGV[base_a + 2 * b - 1]) - spent[b] - in_flight
    local wanted = tonumber(ARGV[base_a + 2 * m + b])
    -- A hold cut short of what the request may use (all that is left) only while nothing else is held:
    -- two in flight at once could each overrun theirs. So at most one answer crosses the budget.
    if available <= 0 or (wanted > available and in_flight > 0) then
      return {-2, b, 0}
    end
    held[b] = math.max(0, math.min(wanted, available))
  end
end

local levels, caps, rates, costs = {}, {}, {}, {}
local worst, worst_wait = 0, 0
for i = 1, n do
  local cap, rate, cost = tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3]), tonumber(ARGV[3 * i + 4])
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
  local id = ARGV[3 * n + 3 * m + 5]
  for b = 1, m do
    if held[b] > 0 then
      local holds, held_key = KEYS[n + 3 * b - 1], KEYS[n + 3 * b]
      redis.call('ZADD', holds, now_ms + tonumber(ARGV[3]), id .. ':' .. string.format('%d', held[b]))
      redis.call('INCRBY', held_key, held[b])
      -- Both keys go a second after the last hold would expire: an idle budget leaves only what is spent.
      local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')
      local gone = math.floor(tonumber(last[2])) + 1000
      redis.call('PEXPIREAT', holds, gone)
      redis.call('PEXPIREAT', held_key, gone)
    end
  end
end

local out = {verdict, worst, worst_wait}
for b = 1, m do
  out[#out + 1] = verdict == 1 and held[b] or 0
end
for i = 1, n do
  out[#out + 1] = math.floor(levels[i])
  out[#out + 1] = math.ceil((caps[i] - levels[i]) / rates[i] * 1000)
end
return out
