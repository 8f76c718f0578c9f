"""Adapter loads off the step path, measured (prints JSON).

stall: the p99 inter-token latency of running streams while COLD adapters load from disk
(each cold request has its own adapter), against the same streams with no loads.
rss: host memory with REGISTERED adapters on disk, each served once through a CPU tier of
--max-cpu-loras: the growth of the process's resident memory against the tier's byte bound.
fill: milliseconds per slot fill (an adapter packed by the loader, placed on the device and
written into a slot, waited for) at each --slots count: a slot costs memory, not time.

    python scripts/bench_adapter_loads.py stall --cold 50 --streams 16 --dtype bfloat16 --rounds 4
    python scripts/bench_adapter_loads.py rss --registered 1000 --max-cpu-loras 64
    python scripts/bench_adapter_loads.py fill --slots 8 64 256 --dtype bfloat16
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lora_jax.engine.llm_engine import LLMEngine
from lora_jax.lora.slots import AdapterSlots
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import RequestOutputKind, SamplingParams
from lora_jax.tools.tenancy import ensure_disk_adapters
from lora_jax.tools.workload import BENCH_CONFIG, ensure_bench_model, parse_targets, random_adapter


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _setup(args, num_adapters: int):
    name = f"model-bench-L{args.num_layers or 'all'}-{args.dtype}"
    model = ensure_bench_model(Path(args.bench_dir) / name, "bench", args.num_layers,
                               "bfloat16" if args.dtype == "bfloat16" else "float32")
    engine = LLMEngine.from_options(str(model), dtype=args.dtype, enable_lora=True,
                                    max_loras=args.max_loras,
                                    max_lora_rank=args.rank, max_cpu_loras=args.max_cpu_loras,
                                    max_num_seqs=args.max_num_seqs, max_model_len=256)
    targets = parse_targets(args.target_modules)
    folder = Path(args.bench_dir) / "adapters" / f"{name}-r{args.rank}-{'_'.join(targets)}"
    paths = ensure_disk_adapters(folder, engine.model_config, num_adapters, args.rank, targets)
    return engine, [LoRARequest(f"bench-{i}", i + 1, p) for i, p in enumerate(paths)]


def _streams(engine, hot, args, tag: str, cold=()) -> list[float]:
    """Run --streams requests on the hot adapter; once all have a token, add the cold
    requests -> the streams' inter-token gaps (seconds) from then until the loads end."""
    rng = np.random.default_rng(0)
    delta = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                           output_kind=RequestOutputKind.DELTA)
    for i in range(args.streams):
        engine.add_request(f"{tag}-{i}", rng.integers(3, 1000, 32).tolist(), delta, hot)
    last: dict[str, float] = {}
    gaps, added = [], False
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            if o.request_id.startswith(tag) and o.outputs and o.outputs[0].token_ids:
                if added and o.request_id in last:
                    gaps.append(now - last[o.request_id])
                last[o.request_id] = now
        if not added and len(last) == args.streams:
            one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
            for j, lora in enumerate(cold):
                engine.add_request(f"cold-{tag}-{j}", [5, 6, 7, 8], one, lora)
            added = True
        elif added and cold and not engine.adapters.loading() and not any(
                s.request.request_id.startswith("cold") for s in engine.core.scheduler.waiting):
            break  # the loads are over: what follows is ordinary decoding
    while engine.has_unfinished_requests():
        engine.step()
    return gaps


def stall(args) -> dict:
    engine, adapters = _setup(args, args.cold * args.rounds + 1)
    hot = adapters[0]
    _streams(engine, hot, args, "warm")  # compiles, and loads the hot adapter
    quiet = _streams(engine, hot, args, "quiet")
    # The 16 streams share each step's gap, so one round's p99 is the longest of a few steps;
    # --rounds pools the gaps of several rounds, each loading COLD adapters not seen before.
    gaps = {"loads": [], "loaded": []}
    loads = {"loads": 0, "loaded": 0}
    for r in range(args.rounds):
        cold = adapters[1 + r * args.cold:1 + (r + 1) * args.cold]
        # "loaded": the same requests again, their adapters now in slots (or the CPU tier):
        # what the extra requests cost the streams without any load, to tell the loads' own
        # cost apart.
        for tag in gaps:
            before = engine.stats().adapter_loads
            gaps[tag] += _streams(engine, hot, args, f"{tag}{r}", cold)
            loads[tag] += engine.stats().adapter_loads - before
    loading, loaded = gaps["loads"], gaps["loaded"]
    p99 = [1e3 * float(np.percentile(g, 99)) for g in (quiet, loading, loaded)]
    return {"streams": args.streams, "cold_adapters": args.cold,
            "itl_ms_p99_no_loads": round(p99[0], 2), "itl_ms_p99_during_loads": round(p99[1], 2),
            "itl_ms_p99_same_requests_adapters_loaded": round(p99[2], 2),
            "ratio": round(p99[1] / p99[0], 3),
            "ratio_vs_same_requests_loaded": round(p99[1] / p99[2], 3),
            "gaps_counted": [len(quiet), len(loading), len(loaded)], "rounds": args.rounds,
            "adapter_loads": loads["loads"], "adapter_loads_in_the_loaded_runs": loads["loaded"]}


def rss(args) -> dict:
    engine, adapters = _setup(args, args.registered)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    engine.add_request("first", [5, 6, 7], one, adapters[0])
    while engine.has_unfinished_requests():
        engine.step()
    start, peak = _rss(), 0
    for i, lora in enumerate(adapters):
        engine.add_request(f"r{i}", [5, 6, 7], one, lora)
        if i % args.max_num_seqs == args.max_num_seqs - 1 or i == len(adapters) - 1:
            while engine.has_unfinished_requests():
                engine.step()
                peak = max(peak, _rss())
    cache = engine.adapters.registry.cache
    return {"registered": len(engine.list_loras()), "max_cpu_loras": args.max_cpu_loras,
            "cpu_tier_bytes_bound": cache.max_bytes, "cpu_tier_bytes": cache.num_bytes,
            "rss_growth_bytes": peak - start, "within_bound": peak - start <= cache.max_bytes,
            "adapter_loads": engine.stats().adapter_loads}


def fill(args) -> dict:
    config = BENCH_CONFIG
    if args.num_layers:
        config = dataclasses.replace(config, num_hidden_layers=args.num_layers)
    targets = parse_targets(args.target_modules)
    rows = {}
    for num_slots in args.slots:
        slots = AdapterSlots(config, num_slots, args.rank, args.dtype)
        slots.warm()  # compiles the fill
        times = []
        for i in range(args.fills + 2):  # each a new adapter id: every activate is one fill
            prepared = slots.prepare(random_adapter(config, args.rank, i, targets))
            start = time.perf_counter()
            slots.activate({i + 1: prepared}, keep=set())
            jax.block_until_ready(slots.stacks)
            times.append(time.perf_counter() - start)
        ms = 1e3 * np.array(times[2:])  # the first fills touch fresh pages
        rows[str(num_slots)] = {"ms_p50": round(float(np.median(ms)), 3),
                                "ms_max": round(float(ms.max()), 3), "fills": len(ms)}
    return {"dtype": args.dtype, "rank": args.rank, "targets": list(targets),
            "device": str(jax.devices()[0]), "by_slots": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("stall", "rss", "fill"))
    parser.add_argument("--cold", type=int, default=50, help="stall: cold adapters to load")
    parser.add_argument("--streams", type=int, default=16, help="stall: running streams")
    parser.add_argument("--rounds", type=int, default=1,
                        help="stall: rounds of COLD new adapters, their gaps pooled")
    parser.add_argument("--output-len", type=int, default=64, help="stall: tokens per stream")
    parser.add_argument("--registered", type=int, default=1000, help="rss: adapters on disk")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 64, 256],
                        help="fill: slot counts to time")
    parser.add_argument("--fills", type=int, default=20, help="fill: fills timed per count")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-cpu-loras", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-modules", default="q_proj,v_proj")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--bench-dir", default=str(Path.home() / ".cache" / "lora-jax" /
                                                   "bench"))
    args = parser.parse_args(argv)
    print(json.dumps({"stall": stall, "rss": rss, "fill": fill}[args.mode](args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
