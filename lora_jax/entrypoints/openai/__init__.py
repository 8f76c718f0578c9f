"""The OpenAI-compatible server (server.build_app). The limits' defaults live here, free of
the server's imports, so that `lora-jax serve --help` shows them without loading it."""

DEFAULT_MAX_N = 128  # choices per request (prompts x n), as vLLM's own bound on n
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
