"""The server edge: the listener, the fast chunk sender, binds, the error envelope."""
