"""`lora-jax bench`: the serving benchmark of lora_jax.tools.serving_bench.

Its options live with the benchmark (scripts/benchmark.py shares them), which imports JAX: the
command line adds them only when the command is `bench`, so other commands start fast.
"""

import argparse
import math

from lora_jax.cli.options import check_model_folder

_POSITIVE = ("num_requests", "rank", "prompt_len", "output_len", "max_loras", "max_num_seqs",
             "max_model_len")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lora_jax.tools.serving_bench import add_arguments as add_bench_arguments

    add_bench_arguments(parser)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Option values out of range: argparse usage errors (exit 2), before any model loads."""
    for name in _POSITIVE:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got "
                         f"{getattr(args, name)}")
    bad = [n for n in args.num_adapters if n < 0]
    if bad:
        parser.error(f"--num-adapters must be integers >= 0, got {bad}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        check_model_folder(args.model)
    from lora_jax.tools.serving_bench import run_command

    return run_command(args)
