"""Shared test setup. Helpers that build tiny checkpoints and adapters live in tests/helpers/."""

import os

# Tests run on the CPU backend; keep XLA from grabbing every core for its own thread pool twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests build small LLMs that run a handful of shapes: compiling every program at start-up
# (the default for users) is left to the tests that check it, and the persistent compilation
# cache stays off so tests never depend on what an earlier run left on disk.
os.environ.setdefault("LORA_JAX_COMPILE_ON_START", "0")
os.environ.setdefault("LORA_JAX_COMPILATION_CACHE_DIR", "")

import pytest  # noqa: E402
from helpers.checkpoints import write_checkpoint  # noqa: E402
from helpers.peft import TinyShapes, make_adapter  # noqa: E402

from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config  # noqa: E402


@pytest.fixture(scope="package")
def base_model(tmp_path_factory):
    """A tiny checkpoint with a char tokenizer (one per test package)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config()))
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return str(folder)


@pytest.fixture(scope="package")
def adapter_dir(tmp_path_factory):
    """A tiny PEFT adapter for base_model (one per test package)."""
    return str(make_adapter(tmp_path_factory.mktemp("lora") / "sql", seed=3,
                            shapes=TinyShapes(2, 64, 32, 96)))
