-- One admission decision, atomically, on Redis server time.
--
-- KEYS[1..n]  bucket hashes {t = level, ts = seconds}; KEYS[n+1] the budget counter when ARGV[2] >= 0
-- ARGV[1]     n, the number of buckets
-- ARGV[2]     lifetime token budget, or -1 for none
-- ARGV[3..]   per bucket: capacity, refill per second, cost of this request
--
-- A bucket refuses when its level is below max(cost, 1), so one in debt
-- refuses even a request that costs it nothing now (tokens are charged after
-- the answer). Either every bucket takes its cost or none does.
--
-- Returns {verdict, refusing bucket (0 = none), wait ms, then per bucket: floor(level), ms until full}
-- verdict: 1 admitted, 0 refused (429), -1 budget spent (402).
local n = tonumber(ARGV[1])
local budget = tonumber(ARGV[2])
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
  if spent >= budget then
    return {-1, 0, 0}
  end
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local levels, caps, rates, costs = {}, {}, {}, {}
local worst, worst_wait = 0, 0
for i = 1, n do
  local cap, rate, cost = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
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
end

local out = {verdict, worst, worst_wait}
for i = 1, n do
  out[#out + 1] = math.floor(levels[i])
  out[#out + 1] = math.ceil((caps[i] - levels[i]) / rates[i] * 1000)
end
return out
