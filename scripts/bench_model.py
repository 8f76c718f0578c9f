"""Decode-step cost of multi-LoRA serving: 8 distinct adapters vs no adapter, one JSON line out.

The bench model (hidden 1024, intermediate 2816, 8 layers, 16 heads, 4 KV heads, vocab 32000,
random weights, float32 unless --dtype bfloat16) decodes one token for each of 32 sequences at
different positions, the way the engine jits it: split once, merge inside jax.jit, cache
donated, greedy token picked inside. With LoRA every sequence uses one of 8 rank-16 adapters
on all seven projections. By bytes read the floor of the ratio is about 1.15; the target is <= 1.25.

    python scripts/bench_model.py [--backend dense] [--rounds 7] [--max-len 256] [--dtype bfloat16]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import Llama, LlamaConfig, init_kv_cache, init_lora_stacks

BENCH = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
             max_position_embeddings=4096)


def make_step(graphdef, backend):
    def step(state, tokens, positions, cache, rows, lora, slots):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(tokens, positions, cache, rows, lora, slots, lora_backend=backend)
        return jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32), cache

    return jax.jit(step, donate_argnums=3)


def random_stacks(config, slots, rank, seed, dtype="float32"):
    """Stacks with every slot filled with random weights (zeros would be just as fast; honest)."""
    stacks = init_lora_stacks(config, slots, rank, dtype)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(stacks))))
    return jax.tree.map(lambda x: 0.01 * jax.random.normal(next(keys), x.shape, x.dtype), stacks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--used", type=int, default=None,
                        help="distinct adapters the batch uses (default: all --adapters slots)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256, help="KV cache length per row")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds; base and LoRA alternate")
    parser.add_argument("--steps", type=int, default=5, help="decode steps per round")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--backend", default=None,
                        help="pallas_kernels backend (default: platform)")
    args = parser.parse_args()

    config = LlamaConfig(head_dim=BENCH["hidden_size"] // BENCH["num_attention_heads"], **BENCH)
    graphdef, state = nnx.split(Llama(config, dtype=args.dtype, rngs=nnx.Rngs(0)))
    lora = random_stacks(config, args.adapters, args.rank, seed=1, dtype=args.dtype)
    rng = np.random.default_rng(0)
    rows = jnp.arange(args.batch, dtype=jnp.int32)
    slots = jnp.asarray(np.arange(args.batch) % (args.used or args.adapters), jnp.int32)
    start = rng.integers(args.max_len // 4, args.max_len // 2, size=(args.batch, 1))
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(args.batch, 1)), jnp.int32)

    runs = {"base": (None, None), "lora": (lora, slots)}
    steps, caches, compile_s = {}, {}, {}
    for name, (stacks, slot) in runs.items():
        cache = init_kv_cache(config, args.batch, args.max_len, args.dtype)
        begin = time.perf_counter()
        steps[name] = make_step(graphdef, args.backend).lower(
            state, tokens, jnp.asarray(start, jnp.int32), cache, rows, stacks, slot).compile()
        compile_s[name] = time.perf_counter() - begin
        caches[name] = cache

    def timed(name, position):
        stacks, slot = runs[name]
        next_tokens, cache = tokens, caches[name]
        begin = time.perf_counter()
        for s in range(args.steps):
            positions = jnp.asarray(start + position + s, jnp.int32)
            next_tokens, cache = steps[name](state, next_tokens[:, None] if s else next_tokens,
                                             positions, cache, rows, stacks, slot)
        next_tokens.block_until_ready()
        caches[name] = cache
        return (time.perf_counter() - begin) / args.steps * 1e3

    for name in runs:  # warm-up round: first runs pay for allocation and page faults
        timed(name, 0)
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name in runs:
            times[name].append(timed(name, (r % 4) * args.steps))
    base, with_lora = statistics.median(times["base"]), statistics.median(times["lora"])
    print(json.dumps({
        "model": BENCH, "dtype": args.dtype, "batch": args.batch, "adapters": args.adapters,
        "used": args.used or args.adapters,
        "rank": args.rank, "max_len": args.max_len,
        "backend": args.backend or "default", "platform": jax.default_backend(),
        "decode_step_ms": {"base": round(base, 2), "lora": round(with_lora, 2)},
        "ratio": round(with_lora / base, 3),
        "min_ms": {name: round(min(t), 2) for name, t in times.items()},
        "first_compile_s": {name: round(t, 2) for name, t in compile_s.items()},
    }))


if __name__ == "__main__":
    main()
