"""Serving an export: the inference engine (KV cache, continuous batching) and the HTTP API."""
