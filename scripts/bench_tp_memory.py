"""Memory of tensor parallelism on the bench model: bytes per device, balance, host peak.

    python scripts/bench_tp_memory.py [--sizes 1 2 4] [--files 4] [--dtype float32]

Writes the bench model (random weights) once as several safetensors files with an index, then
starts one process per tensor-parallel size on 4 forced CPU devices (the device count must be
set before JAX is imported), each creating an LLM and reporting its engine's memory stats. One
JSON object on stdout, per size:
- device_bytes: per device after start-up; balance: the most over the fewest;
- whole: arrays of >= 16K elements some device holds whole (each replicated by design, named);
- host: peak RSS while loading; load_overhead: that peak minus the RSS before loading minus
  what the devices hold after loading (on CPU devices that is host memory too), against the
  largest safetensors file.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEVICES = 4
MIN_ELEMENTS = 16 * 1024


def write_sharded(folder: Path, files: int, dtype: str) -> Path:
    """The bench model in `files` safetensors files of about equal size, with an index."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from lora_jax.tools.serving_bench import ensure_bench_model

    single = ensure_bench_model(folder / "single", dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text((single / "config.json").read_text())
    with safe_open(single / "model.safetensors", framework="np") as f:
        names = sorted(f.keys(), key=_checkpoint_order)
        sizes = {n: int(np.prod(f.get_slice(n).get_shape())) for n in names}
        budget, groups = sum(sizes.values()) / files, [[]]
        for name in names:  # a file closes before it would pass an even share
            if groups[-1] and sum(sizes[n] for n in groups[-1]) + sizes[name] > budget:
                groups.append([])
            groups[-1].append(name)
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: f.get_tensor(n) for n in group}, folder / file,
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for path in single.iterdir():
        path.unlink()
    single.rmdir()
    return folder


def _checkpoint_order(name: str) -> tuple:
    """As save_pretrained writes them: the embedding, the layers in order, the norm, lm_head."""
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer:
        return (1, int(layer.group(1)), name)
    return (0 if "embed" in name else 2, 0, name)


def child(model: str, size: int) -> dict:
    import jax

    from lora_jax import LLM
    from lora_jax.worker.memory import whole_arrays

    jax.devices()  # the backend's own memory is not the load's
    llm = LLM(model, tensor_parallel_size=size, enable_lora=True, max_loras=4,
              max_lora_rank=16, max_num_seqs=8, max_model_len=512, compile_on_start=False)
    engine = llm.engine.core
    named = {"model": engine.runner.state, "lora": engine.adapters.stacks,
             "kv": engine.runner.kv, "history": engine.runner.history,
             "carry": engine.runner.carry}
    return {"stats": engine.stats().memory,
            "whole": whole_arrays(named, MIN_ELEMENTS)}


def summary(out: dict, size: int, largest_file: int) -> dict:
    stats = out["stats"]
    held = [stats["device_bytes_started"][d] for d in sorted(stats["device_bytes_started"],
                                                             key=int)[:size]]
    loaded = sum(stats["device_bytes_loaded"].values())
    overhead = stats["host_peak_rss_load_bytes"] - stats["host_rss_before_load_bytes"] - loaded
    return {"device_bytes": held, "device_mib": [round(b / 2**20, 1) for b in held],
            "balance": round(max(held) / min(held), 4),
            "whole": _grouped(out["whole"]),
            "whole_unnamed": [w for w in out["whole"] if w["name"] is None],
            "host_rss_before_load_mib": round(stats["host_rss_before_load_bytes"] / 2**20, 1),
            "host_peak_rss_load_mib": round(stats["host_peak_rss_load_bytes"] / 2**20, 1),
            "device_loaded_mib": round(loaded / 2**20, 1),
            "load_overhead_mib": round(overhead / 2**20, 1),
            "load_overhead_over_largest_file": round(overhead / largest_file, 3),
            "peak_minus_device_over_largest_file": round(
                (stats["host_peak_rss_load_bytes"] - sum(held)) / largest_file, 3)}


def _grouped(whole: list[dict]) -> dict:
    """Whole arrays by name with the layer index folded: name -> [count, shape, devices]."""
    groups = {}
    for w in whole:
        if w["name"] is not None:
            name = re.sub(r"\[\d+\]", "[*]", w["name"])
            count = groups.get(name, [0])[0]
            groups[name] = [count + 1, w["shape"], w["devices"]]
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--files", type=int, default=4, help="safetensors files of the checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--bench-dir", default="/tmp/lora-jax-bench-tp-memory")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.bench_dir) / f"bench-{args.dtype}-{args.files}files"
    if args.child is not None:
        print(json.dumps(child(str(folder), args.child)))
        return
    write_sharded(folder, args.files, args.dtype)
    largest = max(f.stat().st_size for f in folder.glob("*.safetensors"))
    env = dict(os.environ, LORA_JAX_COMPILE_ON_START="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    report = {"model": "bench", "dtype": args.dtype, "files": args.files,
              "largest_file_mib": round(largest / 2**20, 1), "sizes": {}}
    for size in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", str(size), "--files",
                               str(args.files), "--dtype", args.dtype, "--bench-dir",
                               args.bench_dir], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"tensor_parallel_size {size} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        report["sizes"][str(size)] = summary(out, size, largest)
    print(json.dumps(report, indent=1, separators=(",", ": ")))


if __name__ == "__main__":
    main()
