"""`lora-jax serve` takes vLLM's engine flags and hands them to the engine's config."""

import argparse

from lora_jax.cli import serve
from lora_jax.config import EngineConfig


def _options(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.engine_options(parser.parse_args(["model", *argv]))


def test_vllm_engine_flags_reach_the_engine_config():
    options = _options("--max-num-batched-tokens", "512", "--block-size", "32",
                       "--kv-cache-memory-bytes", "1048576", "--no-enable-prefix-caching",
                       "--no-async-scheduling", "--seed", "7", "--max-num-seqs", "8")
    config = EngineConfig(model="model", **options)
    assert (config.max_num_batched_tokens, config.block_size, config.kv_cache_memory_bytes,
            config.enable_prefix_caching, config.async_scheduling, config.seed,
            config.max_num_seqs) == (512, 32, 1 << 20, False, False, 7, 8)


def test_prefix_caching_and_async_scheduling_are_on_by_default():
    options = _options()
    assert options["enable_prefix_caching"] and options["async_scheduling"]
    assert options["max_num_batched_tokens"] == EngineConfig(model="m").max_num_batched_tokens


def test_sequence_defaults_are_vllms_on_cpu():
    """vLLM's CPU defaults: 256 sequences a step for the LLM class, 128 for its server."""
    assert EngineConfig(model="m").max_num_seqs == 256
    assert _options()["max_num_seqs"] == 128
