"""sluicegate bench: a load tester for OpenAI-compatible endpoints."""
