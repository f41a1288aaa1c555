"""What each request leaves behind: the record, event sinks, metrics."""
