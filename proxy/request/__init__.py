"""The request path: auth, providers, endpoints, relay, upstream, usage, the answer's state."""
