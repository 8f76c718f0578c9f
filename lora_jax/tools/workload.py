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


def random_adapter(config: LlamaConfig, rank: int, seed: int,
                   targets: tuple[str, ...] = PROJECTIONS) -> LoRAAdapter:
    """An in-memory adapter on `targets` (default: all seven projections) with random,
    non-zero A and B."""
    rng = np.random.default_rng(seed)
    layers, modules = config.num_hidden_layers, {}
    for proj in targets:
        d_in, d_out = config.projection_shapes()[proj]
        modules[proj] = LoRAWeights(
            (rng.standard_normal((layers, d_in, rank)) / np.sqrt(d_in)).astype(np.float32),
            (rng.standard_normal((layers, rank, d_out)) * 0.01).astype(np.float32))
    return LoRAAdapter(name=f"bench-{seed}", modules=modules, path=f"memory://bench-{seed}")


def parse_targets(text: str) -> tuple[str, ...]:
    """--target-modules: "all", or projections joined by commas (q_proj,v_proj)."""
    if text == "all":
        return PROJECTIONS
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = sorted(set(names) - set(PROJECTIONS))
    if unknown or not names:
        raise ValueError(f"--target-modules: unknown projection(s) {unknown}; choose from "
                         f"{', '.join(PROJECTIONS)} (or all)")
    return names


def parse_distribution(text: str) -> tuple[str, float]:
    """--adapter-distribution: round-robin, uniform, or zipf:S (any S > 0)."""
    if text in ("round-robin", "uniform"):
        return text, 0.0
    if text.startswith("zipf:"):
        try:
            exponent = float(text[5:])
        except ValueError:
            exponent = -1.0
        if exponent > 0:
            return "zipf", exponent
    raise ValueError(f"--adapter-distribution must be round-robin, uniform or zipf:S with "
                     f"S > 0 (e.g. zipf:1.1), got {text!r}")


def adapter_picks(distribution: str, num_adapters: int, num_requests: int,
                  seed: int) -> list[int]:
    """Which adapter (0-based) each request uses: in turn, uniformly at random, or by a
    Zipf law over the adapters (adapter k drawn with weight 1 / (k + 1) ** S)."""
    kind, exponent = parse_distribution(distribution)
    if kind == "round-robin":
        return [i % num_adapters for i in range(num_requests)]
    rng = np.random.default_rng(seed + 1)  # the prompts' generator stays as it was
    if kind == "uniform":
        return rng.integers(0, num_adapters, num_requests).tolist()
    weights = 1.0 / np.arange(1, num_adapters + 1) ** exponent
    return rng.choice(num_adapters, size=num_requests, p=weights / weights.sum()).tolist()


def workload(args, num_adapters: int, vocab: int, paths: list[str] | None = None):
    """(prompts, lora requests): requests over the adapters by --adapter-distribution
    (round-robin by default, with the base model first in turn with --include-base); no
    adapters means all base. paths: the adapters' folders (default: in-memory names)."""
    rng = np.random.default_rng(args.seed)
    shared = rng.integers(3, vocab, args.shared_prefix).tolist()  # one prefix for every request
    prompts = [{"prompt_token_ids": shared + rng.integers(3, vocab, args.prompt_len).tolist()}
               for _ in range(args.num_requests)]
    groups = [None] * (args.include_base or not num_adapters) + [
        LoRARequest(f"bench-{i}", i + 1, paths[i] if paths else f"memory://bench-{i}")
        for i in range(num_adapters)]
    distribution = getattr(args, "adapter_distribution", "round-robin")
    picks = adapter_picks(distribution, len(groups), args.num_requests, args.seed)
    return prompts, [groups[i] for i in picks]
