"""Our Redis client: the pipe, cluster routing, client construction."""
