"""Time every backend of pallas_kernels on decode-like and prefill-like batches; print JSON.

    python scripts/bench_kernels.py            # Llama-7B sizes (D=4096, R=16), for a GPU
    python scripts/bench_kernels.py --reduced  # D=1024 and fewer tokens, for a CPU
    python scripts/bench_kernels.py --forms    # the plain-XLA forms against the slot count

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
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import tiled

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
    a = jnp.asarray(rng.standard_normal((num_slots, d_in, rank)) * d_in**-0.5, dtype)
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
        (normal(num_slots, d, rank * len(ws), scale=d**-0.5),
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


def _tile_branch(slot: np.ndarray, num_slots: int) -> int:
    """The tile branch a step with these slots would take were it not compact."""
    tokens = slot.shape[0]
    rows = tiled.tile_rows(tokens)
    counts = np.bincount(slot[slot >= 0], minlength=num_slots)
    used = int(np.sum(-(-counts // rows)))
    ladder = tiled.tile_ladder(tokens, num_slots)
    return len(tiled.COMPACT_LADDER) + int(np.searchsorted(ladder, used))


def _form_fns(num_slots: int, tile_branch: int, tokens: int) -> dict:
    """name -> fn(y, x, a, bs, slot): the forms of one LoRA site (shrink + expand of q|k|v);
    the per-token gather only up to 256 tokens (it takes far longer above)."""
    def tiled_form(y, x, a, bs, slot, force=None):
        meta = tiled.step_meta(slot, num_slots)
        if force is not None:
            meta = meta._replace(branch=jnp.int32(force))
        return pk.lora_apply_sliced(y, x, a, bs, slot, backend="tiled", meta=meta)

    fns = {
        "dense": lambda *args: pk.lora_apply_sliced(*args, backend="dense"),
        "gather": lambda *args: pk.lora_apply_sliced(*args, backend="reference"),
        "tiled": tiled_form,
        "tiled:tiles_only": functools.partial(tiled_form, force=tile_branch),
        "meta_only": lambda y, x, a, bs, slot: tiled.step_meta(slot, num_slots).branch,
    }
    if tokens > 256:
        del fns["gather"]
    return fns


def bench_forms(tokens_list, slots_list, ranks, distinct_list, dtype, rounds, inner,
                clock) -> list[dict]:
    """ms per call of each plain-XLA form of a fused q|k|v site (bench model: D = 1024, k|v
    256 wide): T tokens, S slots, rank R, `distinct` adapters used by the step's tokens."""
    rng = np.random.default_rng(2)
    d, widths, rows = 1024, (1024, 256, 256), []
    for tokens in tokens_list:
        for num_slots in slots_list:
            for rank in ranks:
                x = jnp.asarray(rng.standard_normal((tokens, d)), dtype)
                y = jnp.asarray(rng.standard_normal((tokens, sum(widths))), dtype)
                a = jnp.asarray(rng.standard_normal((num_slots, d, 3 * rank)) * d**-0.5, dtype)
                bs = tuple(jnp.asarray(rng.standard_normal((num_slots, rank, w)), dtype)
                           for w in widths)
                for distinct in sorted({min(n, tokens, num_slots) for n in distinct_list}):
                    used = rng.choice(num_slots, distinct, replace=False)
                    slot = used[np.arange(tokens) % distinct][rng.permutation(tokens)]
                    fns = {n: jax.jit(f) for n, f in
                           _form_fns(num_slots, _tile_branch(slot, num_slots), tokens).items()}
                    times = _time(fns, (y, x, a, bs, jnp.asarray(slot, jnp.int32)), rounds,
                                  inner, clock)
                    rows.append({"T": tokens, "S": num_slots, "R": rank, "distinct": distinct,
                                 "ms": {n: round(t * 1e3, 4) for n, t in times.items()}})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="CPU sizes: D=1024, fewer tokens")
    parser.add_argument("--backends", nargs="*", help="subset, e.g. reference dense pallas:gather")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (best is kept)")
    parser.add_argument(
        "--clock", choices=["wall", "process"], default="wall",
        help="process: CPU seconds of this process, steadier on a CPU shared with other jobs",
    )
    parser.add_argument("--forms", action="store_true",
                        help="compare the plain-XLA forms (dense, per-token gather, tiled) over "
                             "tokens, slots, ranks and distinct adapters per step")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 4, 16, 1024],
                        help="distinct adapters per step (capped by T and S)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.forms:
        dtype = jnp.bfloat16
        rows = bench_forms(args.tokens, args.slots, args.ranks, args.distinct, dtype,
                           args.rounds or 5, 3, clock)
        print(json.dumps({"platform": jax.default_backend(), "dtype": "bfloat16", "D": 1024,
                          "site": "q|k|v (1024|256|256)", "clock": args.clock,
                          "forms": rows}, indent=1))
        return
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
