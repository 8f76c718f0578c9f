"""The benchmarks' shared inputs: the bench models (random weights), random adapters, and the
request workload. A leaf module: the benchmark and its peers import it, it imports neither.
"""

import dataclasses
from pathlib import Path

import numpy as np

from lora_jax.lora.adapters import PROJECTIONS, LoRAAdapter, LoRAWeights
from lora_jax.request import LoRARequest
from models import Llama, LlamaConfig

BENCH_CONFIG = LlamaConfig(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2048,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


# Llama-3-8B's shapes (random weights) for the GPU benchmark.
LLAMA3_8B_CONFIG = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
SHAPES = {"bench": BENCH_CONFIG, "llama3-8b": LLAMA3_8B_CONFIG}


def ensure_bench_model(folder: Path, shape: str = "bench", num_layers: int | None = None,
                       dtype: str = "float32") -> Path:
    """A bench model (random weights, `shape`'s config) as a Hugging Face folder, written
    once."""
    if not (folder / "config.json").is_file():
        from flax import nnx

        from lora_jax.tools.tiny import save_llama

        config = SHAPES[shape]
        if num_layers:
            config = dataclasses.replace(config, num_hidden_layers=num_layers)
        save_llama(Llama(config, dtype=dtype, rngs=nnx.Rngs(0)), folder)
    return folder


def random_adapter(config: LlamaConfig, rank: int, seed: int) -> LoRAAdapter:
    """An in-memory adapter on all seven projections with random, non-zero A and B."""
    rng = np.random.default_rng(seed)
    layers, modules = config.num_hidden_layers, {}
    for proj in PROJECTIONS:
        d_in, d_out = config.projection_shapes()[proj]
        modules[proj] = LoRAWeights(
            (rng.standard_normal((layers, d_in, rank)) / np.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal((layers, rank, d_out)) * 0.01).astype(np.float32))
    return LoRAAdapter(name=f"bench-{seed}", modules=modules, path=f"memory://bench-{seed}")


def workload(args, num_adapters: int, vocab: int):
    """(prompts, lora requests): requests cycle over the adapters (and the base model first,
    with --include-base); no adapters means all base."""
    rng = np.random.default_rng(args.seed)
    shared = rng.integers(3, vocab, args.shared_prefix).tolist()  # one prefix for every request
    prompts = [{"prompt_token_ids": shared + rng.integers(3, vocab, args.prompt_len).tolist()}
               for _ in range(args.num_requests)]
    groups = [None] * (args.include_base or not num_adapters) + [
        LoRARequest(f"bench-{i}", i + 1, f"memory://bench-{i}") for i in range(num_adapters)]
    return prompts, [groups[i % len(groups)] for i in range(args.num_requests)]
