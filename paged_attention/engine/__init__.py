"""The engine: step loop, model runner, request state, and the `LLM` API."""
