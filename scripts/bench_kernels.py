"""Time every backend of pallas_kernels on decode-like and prefill-like batches; print JSON.

    python scripts/bench_kernels.py            # Llama-7B sizes (D=4096, R=16), for a GPU
    python scripts/bench_kernels.py --reduced  # D=1024 and fewer tokens, for a CPU

Each row times lora_apply (shrink + expand) on one batch: time, achieved GB/s over the bytes the
op must move at least (x, y in, y out, each distinct adapter used once), TFLOP/s over the useful
FLOPs (2*T*R*(D_in + D_out), tokens with an adapter), and speedup over the reference backend. On
GPU also the fraction of the memory-bandwidth floor reached (H200: about 4.3 TB/s).
decode_step: the product's CPU target, a decode step's 7 projections (hidden 1024, intermediate
2816, fused q|k|v and gate|up) for 32 sequences over 8 rank-16 adapters, against the same step
without adapters.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

HBM_BYTES_PER_S = 4.3e12  # H200 device copy, measured on the lent machine


def _time(fns: dict, args: tuple, rounds: int, inner: int, clock=time.perf_counter) -> dict:
    """Best per-call seconds of each function; rounds interleave them so load hits all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            for _ in range(inner):
                out = fn(*args)
            jax.block_until_ready(out)
            best[name] = min(best[name], (clock() - start) / inner)
    return best


def _backends(on_gpu: bool, requested: list[str] | None) -> dict:
    """name -> lora_apply keyword arguments."""
    every = {
        "reference": {"backend": "reference"},
        "dense": {"backend": "dense"},
        "pallas:gather": {"backend": "pallas", "pattern": "gather"},
        "pallas:grouped": {"backend": "pallas", "pattern": "grouped"},
        "pallas_interpret:gather": {"backend": "pallas_interpret", "pattern": "gather"},
    }
    default = ["reference", "dense"] + (["pallas:gather", "pallas:grouped"] if on_gpu else [])
    return {name: every[name] for name in (requested or default)}


def _case(rng, tokens, num_slots, rank, d_in, d_out, dtype):
    x = jnp.asarray(rng.standard_normal((tokens, d_in)), dtype)
    y = jnp.asarray(rng.standard_normal((tokens, d_out)), dtype)
    a = jnp.asarray(rng.standard_normal((d_in, num_slots, rank)) * d_in**-0.5, dtype)
    b = jnp.asarray(rng.standard_normal((num_slots, rank, d_out)) * rank**-0.5, dtype)
    slot = jnp.asarray(rng.integers(0, num_slots, tokens), jnp.int32)
    return y, x, a, b, slot


def bench_apply(cases, backends, dtype, on_gpu, rounds, inner, clock) -> list[dict]:
    rng = np.random.default_rng(0)
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for kind, tokens, num_slots, rank, d_in, d_out in cases:
        args = _case(rng, tokens, num_slots, rank, d_in, d_out, dtype)
        used = len(np.unique(np.asarray(args[-1])))
        moved = itemsize * (tokens * (d_in + 2 * d_out) + used * rank * (d_in + d_out))
        flops = 2 * tokens * rank * (d_in + d_out)
        fns = {n: jax.jit(functools.partial(pk.lora_apply, **kw)) for n, kw in backends.items()}
        times = _time(fns, args, rounds, inner, clock)
        for name, seconds in times.items():
            row = {
                "case": kind, "backend": name, "T": tokens, "S": num_slots, "R": rank,
                "D_in": d_in, "D_out": d_out, "time_us": round(seconds * 1e6, 2),
                "GB_s": round(moved / seconds / 1e9, 2),
                "TFLOP_s": round(flops / seconds / 1e12, 4),
                "speedup_vs_reference": round(times["reference"] / seconds, 2)
                if "reference" in times else None,
            }
            if on_gpu:
                row["bw_floor_fraction"] = round(moved / HBM_BYTES_PER_S / seconds, 3)
            rows.append(row)
    return rows


def bench_decode_step(backends, dtype, rounds, inner, clock) -> dict:
    """Ratio of a decode step's projections with adapters to the same step without."""
    tokens, hidden, inter, kv, num_slots, rank = 32, 1024, 2816, 256, 8, 16
    rng = np.random.default_rng(1)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    # (D_in, slice widths) of the fused projections: q|k|v, o, gate|up, down.
    projections = [(hidden, (hidden, kv, kv)), (hidden, (hidden,)), (hidden, (inter, inter)),
                   (inter, (hidden,))]
    weights = [normal(d, sum(ws), scale=d**-0.5) for d, ws in projections]
    stacks = [
        (normal(d, num_slots, rank * len(ws), scale=d**-0.5),
         tuple(normal(num_slots, rank, w, scale=rank**-0.5) for w in ws))
        for d, ws in projections
    ]
    x = {d: normal(tokens, d) for d in (hidden, inter)}
    slot = jnp.asarray(rng.permutation(np.arange(tokens) % num_slots), jnp.int32)

    def step(x, weights, stacks, slot, kwargs):
        outs = []
        for (d, _), w, st in zip(projections, weights, stacks, strict=True):
            y = x[d] @ w
            if kwargs is not None:
                y = pk.lora_apply_sliced(y, x[d], st[0], st[1], slot, **kwargs)
            outs.append(y)
        return outs

    fns = {"no_adapters": jax.jit(functools.partial(step, kwargs=None))}
    for name, kw in backends.items():
        fns[name] = jax.jit(functools.partial(step, kwargs=kw))
    times = _time(fns, (x, weights, stacks, slot), rounds, inner, clock)
    base = times["no_adapters"]
    return {
        "T": tokens, "S": num_slots, "R": rank, "hidden": hidden, "intermediate": inter,
        "kv_width": kv, "time_us": {n: round(t * 1e6, 1) for n, t in times.items()},
        "ratio_to_no_adapters": {
            n: round(t / base, 3) for n, t in times.items() if n != "no_adapters"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="CPU sizes: D=1024, fewer tokens")
    parser.add_argument("--backends", nargs="*", help="subset, e.g. reference dense pallas:gather")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (best is kept)")
    parser.add_argument(
        "--clock", choices=["wall", "process"], default="wall",
        help="process: CPU seconds of this process, steadier on a CPU shared with other jobs",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    on_gpu = jax.default_backend() == "gpu"
    backends = _backends(on_gpu, args.backends)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    if args.reduced:
        d, rank = 1024, 16
        cases = [("decode", 1, 8, rank, d, d), ("decode", 32, 8, rank, d, d),
                 ("decode", 256, 32, rank, d, d), ("prefill", 1024, 4, rank, d, d)]
        rounds, inner = args.rounds or 15, 5
    else:
        d, rank = 4096, 16
        cases = [("decode", t, 64, rank, d, d) for t in (1, 16, 64, 256)]
        cases += [("decode", 64, 8, rank, d, d), ("prefill", 4096, 8, rank, d, d),
                  ("prefill", 4096, 64, rank, d, d)]
        rounds, inner = args.rounds or 10, 20
    report = {
        "platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__, "dtype": jnp.dtype(dtype).name, "reduced": args.reduced,
        "clock": args.clock, "default_backend": pk.default_backend(),
        "apply": bench_apply(cases, backends, dtype, on_gpu, rounds, inner, clock),
    }
    if not on_gpu:
        # A small difference between two long runs: more rounds than the rows above.
        report["decode_step"] = bench_decode_step(backends, dtype, 3 * rounds, inner, clock)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
