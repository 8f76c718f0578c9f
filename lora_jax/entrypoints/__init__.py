"""User-facing entry points: LLM (offline)."""
