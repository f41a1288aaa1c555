"""Rate limits and budgets: the Redis key schema, plans, the limiter, its Lua scripts."""
