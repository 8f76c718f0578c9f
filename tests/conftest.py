"""Shared test setup. Helpers that build tiny checkpoints and adapters live in tests/helpers/."""

import os

# Tests run on the CPU backend; keep XLA from grabbing every core for its own thread pool twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
