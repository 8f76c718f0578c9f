"""Shared test setup. Helpers that build tiny checkpoints and adapters live in tests/helpers/."""

import os
import shutil
import tempfile

# Tests run on the CPU backend; keep XLA from grabbing every core for its own thread pool twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most tests build small LLMs that run a handful of shapes: compiling every program at start-up
# (the default for users) is left to the tests that check it.
os.environ.setdefault("LORA_JAX_COMPILE_ON_START", "0")
# The tests' models are tiny: compiling dominates their time, and LLVM's optimizations of
# XLA:CPU's loops cost more to run than they save (the big matmuls are library calls either way).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
# Many tests build the same tiny programs again: one persistent compilation cache per test run
# lets later tests load them instead of compiling. The first process to read this file (the
# xdist controller, or pytest alone) makes an empty folder; the xdist workers it starts inherit
# it; the process that made it removes it at the end. Nothing left by an earlier run is read.
_OWN_XLA_CACHE = "LORA_JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
    os.environ["LORA_JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lora-jax-test-xla-")

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



def pytest_sessionfinish(session):
    """The process that made this run's compilation cache removes it."""
    if _OWN_XLA_CACHE:
        shutil.rmtree(os.environ["LORA_JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Modules that hold slow (end-to-end) tests run first, each module's tests still together
    and in order, so the test workers do not end on a few long tests while the other idles."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow_modules)
