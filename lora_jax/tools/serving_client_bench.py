"""A serving benchmark against a running OpenAI-compatible server, in the style of vLLM's
benchmark_serving: N streamed completions at a request rate (Poisson arrivals) or a fixed
concurrency, spread over M model names (the base and adapters); time to first token, time
per output token and inter-token latency (mean, p50, p99), request and token throughput.

`lora-jax bench --serve URL` and scripts/bench_serving.py call `run_command`. Prompts are
random token ids (so any model with a vocabulary above `--token-range`'s top serves them),
outputs are greedy with ignore_eos, so every request generates exactly --output-len tokens.
"""

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RequestResult:
    model: str
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first generated text
    latency: float = 0.0  # seconds from sending to the last chunk
    itl: list[float] = field(default_factory=list)  # gaps between chunks after the first


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Options only the client benchmark has (the shared ones live in serving_bench)."""
    p.add_argument("--serve", default=None, metavar="URL",
                   help="benchmark a running server (http://HOST:PORT) instead of an engine")
    p.add_argument("--models", nargs="+", default=None,
                   help="model names to spread requests over (default: all of /v1/models)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="untimed requests sent first at the run's concurrency, so that the "
                        "server compiles its batch shapes before the clock starts (default: "
                        "max(models, max-concurrency or num-requests); 0: none)")
    p.add_argument("--token-range", type=int, nargs=2, default=(3, 98), metavar=("LOW", "HIGH"),
                   help="prompt token ids are drawn from [LOW, HIGH)")
    p.add_argument("--api-key", default="none", help="the server's --api-key")


async def _one(client, model: str, prompt: list[int], output_len: int) -> RequestResult:
    result = RequestResult(model)
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
            if not chunk.choices:  # the usage chunk
                continue
            # Every chunk is one engine step's tokens, with or without text (a model without
            # a tokenizer streams empty text; text held back for a stop string is empty too).
            if not result.ttft:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        result.latency = last - start
        result.ok = result.output_tokens > 0
    except Exception as exc:  # a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_requests(url: str, models: list[str], prompts: list[list[int]], output_len: int,
                       request_rate: float, max_concurrency: int | None, seed: int,
                       api_key: str = "none") -> tuple[list[RequestResult], float]:
    """Send every prompt (request i to models[i % M]); -> (results, wall seconds)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=max(len(prompts), 1) + 4)
    gate = asyncio.Semaphore(max_concurrency or len(prompts) or 1)
    rng = np.random.default_rng(seed)
    async with openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key,
                                  max_retries=0, timeout=3600,
                                  http_client=httpx.AsyncClient(limits=limits,
                                                                timeout=3600)) as client:
        async def gated(i: int, prompt: list[int]) -> RequestResult:
            async with gate:
                return await _one(client, models[i % len(models)], prompt, output_len)

        tasks, start = [], time.perf_counter()
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(gated(i, prompt)))
            if request_rate != float("inf") and i + 1 < len(prompts):
                await asyncio.sleep(rng.exponential(1.0 / request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def _stats(values: list[float]) -> dict:
    """mean / p50 / p99 in milliseconds (None when there is nothing to measure)."""
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ms = np.asarray(values) * 1e3
    return {"mean": round(float(ms.mean()), 3), "p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3)}


def summarize(results: list[RequestResult], seconds: float) -> dict:
    done = [r for r in results if r.ok]
    inp, out = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    per_model: dict[str, int] = {}
    for r in done:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    return {"num_requests": len(results), "completed": len(done),
            "failed": len(results) - len(done),
            "errors": sorted({r.error for r in results if r.error})[:5],
            "duration_s": round(seconds, 3), "input_tokens": inp, "output_tokens": out,
            "request_throughput": round(len(done) / seconds, 3),
            "output_throughput": round(out / seconds, 2),
            "total_token_throughput": round((inp + out) / seconds, 2),
            "ttft_ms": _stats([r.ttft for r in done]), "tpot_ms": _stats(tpot),
            "itl_ms": _stats([g for r in done for g in r.itl]),
            "e2e_latency_ms": _stats([r.latency for r in done]), "per_model": per_model}


def plot(results: list[RequestResult], report: dict, path: str) -> str | None:
    """TTFT and inter-token latency histograms as a PNG; None (with a reason) without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist([r.ttft * 1e3 for r in done], bins=30)
    axes[0].set(xlabel="time to first token (ms)", ylabel="requests")
    axes[1].hist([g * 1e3 for r in done for g in r.itl], bins=30)
    axes[1].set(xlabel="inter-token latency (ms)", ylabel="token gaps")
    fig.suptitle(f"{report['completed']} requests, concurrency {report['max_concurrency']}, "
                 f"{report['output_throughput']} output tok/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def list_models(url: str, api_key: str = "none") -> list[str]:
    import httpx

    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=60,
                  headers={"Authorization": f"Bearer {api_key}"})
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def run_command(args: argparse.Namespace) -> int:
    models = args.models or list_models(args.serve, args.api_key)
    rng = np.random.default_rng(args.seed)
    low, high = args.token_range
    prompts = [rng.integers(low, high, args.prompt_len).tolist()
               for _ in range(args.num_requests)]
    warmup = args.warmup_requests
    if warmup is None:
        warmup = max(len(models), args.max_concurrency or args.num_requests)
    if warmup:
        warm = [rng.integers(low, high, args.prompt_len).tolist() for _ in range(warmup)]
        asyncio.run(run_requests(args.serve, models, warm, args.output_len, float("inf"),
                                 args.max_concurrency, args.seed, args.api_key))
    results, seconds = asyncio.run(run_requests(
        args.serve, models, prompts, args.output_len, args.request_rate, args.max_concurrency,
        args.seed, args.api_key))
    report = {"url": args.serve, "models": models, "prompt_len": args.prompt_len,
              "warmup_requests": warmup,
              "output_len": args.output_len, "request_rate": str(args.request_rate),
              "max_concurrency": args.max_concurrency, **summarize(results, seconds)}
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.plot:
        if plot(results, report, args.plot) is None:
            print("no plot: matplotlib is not installed (pip install 'lora-jax[plot]')")
        else:
            print(f"plot: {args.plot}")
    return 0 if report["failed"] == 0 else 1
