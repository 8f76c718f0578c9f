"""`lora-jax serve MODEL`: the OpenAI-compatible server under uvicorn."""

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

from lora_jax.cli.errors import CommandError
from lora_jax.cli.options import check_model_folder, port, positive_int
from lora_jax.entrypoints.openai import DEFAULT_MAX_N, DEFAULT_MAX_REQUEST_BYTES
from lora_jax.request import LoRARequest

GRACE_S = 5  # seconds running requests get to finish after SIGTERM / Ctrl-C
# After the grace period, how long stopping the engine may take before the process ends anyway.
STOP_S = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local model folder (Hugging Face layout)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients use for the base model (default: MODEL)")
    parser.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="adapters to serve: name=path, or JSON "
                             '{"name": ..., "path": ..., "base_model_name": ...}')
    _add_engine_arguments(parser.add_argument_group("engine"))
    _add_server_arguments(parser.add_argument_group("HTTP server"))


def _add_engine_arguments(parser) -> None:
    parser.add_argument("--max-loras", type=positive_int, default=1,
                        help="adapter slots on the device: distinct adapters in one step")
    parser.add_argument("--max-cpu-loras", type=positive_int, default=None,
                        help="adapters kept loaded in host memory (default: max(max-loras, 8))")
    parser.add_argument("--max-cpu-lora-bytes", type=positive_int, default=None,
                        help="host bytes of the adapters kept loaded (default: max-cpu-loras "
                             "adapters of max-lora-rank on every projection)")
    parser.add_argument("--max-lora-rank", type=positive_int, default=16,
                        help="the largest adapter rank served; higher ranks are refused")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="compute dtype (auto: the checkpoint's)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="tokens per sequence, prompt and output (default: the model's "
                             "max_position_embeddings)")
    parser.add_argument("--max-num-seqs", type=positive_int, default=128,
                        help="sequences per step (default: vLLM's server default on CPU)")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                        help="tokens in one step (decodes and prefill chunks)")
    parser.add_argument("--block-size", type=positive_int, default=16,
                        help="tokens per KV cache block (a power of two)")
    parser.add_argument("--kv-cache-memory-bytes", type=positive_int, default=None,
                        help="the KV cache pool's size (default: what max-num-seqs "
                             "full-length sequences need, at most 4 GiB on CPU)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="reuse cached KV of shared prompt prefixes")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=True, help="overlap the host's work with the device's")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the samples of requests that give none")
    parser.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                        help="split the model over this many devices (on CPU, set XLA_FLAGS="
                             "--xla_force_host_platform_device_count=N to have N)")
    parser.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                        help="several processes on one mesh: process 0's address for "
                             "jax.distributed (every process gets the same)")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="processes (hosts) that serve one model together")
    parser.add_argument("--process-id", type=int, default=0,
                        help="0 serves HTTP; the others only run the model's steps")


def _add_server_arguments(parser) -> None:
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template file (or the template itself)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health, "
                             "/version and /metrics")
    parser.add_argument("--max-n", type=positive_int, default=DEFAULT_MAX_N,
                        help="the most choices one request may ask for (prompts x n)")
    parser.add_argument("--max-request-bytes", type=positive_int,
                        default=DEFAULT_MAX_REQUEST_BYTES,
                        help="the largest request body; larger ones get 413 unread")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprob tokens as 'token_id:N' unless a request says otherwise")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true",
                        help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    parser.add_argument("--lora-root", default=None,
                        help="the folder runtime-loaded adapters must lie in")
    parser.add_argument("--allow-hub-adapters", action="store_true",
                        help="let runtime loading take Hugging Face Hub ids")
    parser.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds")
    parser.add_argument("--port", type=port, default=8000, help="HTTP port")


def parse_lora_modules(items: list[str]) -> list[LoRARequest]:
    """name=path or JSON items -> LoRARequests with ids 1, 2, ...; ValueError naming a bad one."""
    out: list[LoRARequest] = []
    for i, item in enumerate(items, start=1):
        if item.lstrip().startswith("{"):
            try:
                spec = json.loads(item)
                name, path = spec["name"], spec["path"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"--lora-modules {item!r}: JSON needs 'name' and 'path' "
                                 f"({exc})") from exc
            base = spec.get("base_model_name")
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {item!r}: write it as name=path")
            base = None
        if any(lr.lora_name == name for lr in out):
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        out.append(LoRARequest(name, i, path, base_model_name=base))
    return out


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--lora-modules written wrong, or given without --enable-lora: usage errors (exit 2)."""
    try:
        args.lora_requests = parse_lora_modules(args.lora_modules)
    except ValueError as err:
        parser.error(str(err))
    if args.lora_requests and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig options the command line sets."""
    return dict(
        dtype=args.dtype, enable_lora=args.enable_lora,
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        max_cpu_lora_bytes=args.max_cpu_lora_bytes,
        max_lora_rank=args.max_lora_rank, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        enable_prefix_caching=args.enable_prefix_caching,
        async_scheduling=args.async_scheduling, seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        coordinator_address=args.coordinator_address, num_processes=args.num_processes,
        process_id=args.process_id)


def run(args: argparse.Namespace) -> int:
    """Load the model and every adapter (a bad one stops start-up, saying which), then serve."""
    check_model_folder(args.model)
    import uvicorn

    from lora_jax.engine.async_llm import AsyncLLM
    from lora_jax.entrypoints.openai.server import build_app

    loras = args.lora_requests
    options = engine_options(args)
    if args.process_id != 0:  # a follower: mirror process 0's device calls until it stops
        from lora_jax.engine.llm_engine import LLMEngine
        from lora_jax.worker.distributed import STOP

        LLMEngine.from_options(args.model, **options).core.follow(until=(STOP,))
        return 0
    llm = AsyncLLM.from_options(args.model, **options)
    try:
        for lr in loras:  # load each now, so a bad adapter stops start-up with its reason
            try:
                llm.call(llm.engine.add_lora, lr)
            except (ValueError, OSError) as err:
                raise CommandError(f"adapter {lr.lora_name!r} ({lr.lora_path}): {err}") from err
    except BaseException:
        llm.shutdown()
        raise
    app = build_app(llm, args)
    # SIGTERM / Ctrl-C: stop accepting, give running requests GRACE_S to finish, then cancel
    # them (their requests are aborted), stop the engine and exit 0.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=GRACE_S)
    name = args.served_model_name or args.model
    server = _make_server(config, f"lora-jax: serving {name} at "
                                  f"http://{args.host}:{args.port}/v1")
    try:
        server.run()
    finally:
        llm.shutdown()
    print("lora-jax: stopped", flush=True)
    return 0


def _make_server(config, banner: str):
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # the socket is bound: clients may connect from here on
                print(banner, flush=True)

        def stop(self, sig, frame):
            if not self.should_exit:  # the first signal: a deadline for the whole stop
                threading.Thread(target=_exit_after, args=(GRACE_S + STOP_S,), daemon=True,
                                 name="lora-jax-stop-deadline").start()
            self.handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after shutting down (exit status -15, or a
            # KeyboardInterrupt traceback); a requested shutdown that went well exits 0.
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.stop) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)


def _exit_after(seconds: float) -> None:
    """Whatever still runs (an engine call that does not return, a worker thread the
    interpreter would wait for at exit), the process ends `seconds` after the signal."""
    time.sleep(seconds)
    print(f"lora-jax: not stopped {seconds} s after the signal; exiting now", file=sys.stderr,
          flush=True)
    os._exit(1)
