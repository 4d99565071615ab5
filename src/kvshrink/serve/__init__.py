"""kvshrink serve: an OpenAI-compatible server with continuous batching over compressed caches."""
