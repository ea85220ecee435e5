"""Serving: OpenAI-compatible worker servers, the disaggregated router, and their plumbing.

``options`` (flags + LLM-API YAML), ``protocol`` (request validation, error and response
bodies), ``detokenize`` / ``output`` (text and stop handling), ``engine_loop`` (the engine's
thread), ``openai_server`` (one worker's HTTP API), ``kv_transfer`` (KV hand-over over HTTP),
``disagg_config`` / ``router`` (disaggregated serving), ``metrics`` (Prometheus text),
``worker`` / ``launch`` (building and running processes).
"""
