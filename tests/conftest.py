"""Shared test setup. Helpers that build tiny checkpoints and adapters live in tests/helpers/."""

import os

# Tests run on the CPU backend; keep XLA from grabbing every core for its own thread pool twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests build small LLMs that run a handful of shapes: compiling every program at start-up
# (the default for users) is left to the tests that check it, and the persistent compilation
# cache stays off so tests never depend on what an earlier run left on disk.
os.environ.setdefault("LORA_JAX_COMPILE_ON_START", "0")
os.environ.setdefault("LORA_JAX_COMPILATION_CACHE_DIR", "")
