"""sluicegate: an OpenAI-compatible LLM API gateway."""
