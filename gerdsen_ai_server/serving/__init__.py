"""API-neutral request handling (vLLM's serving_* role): resolve the model, budget, submit, collect, stream."""
