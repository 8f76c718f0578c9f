"""The `lora-jax` command line."""

import argparse
import sys

from lora_jax.cli.serve import add_arguments as add_serve_arguments
from lora_jax.cli.serve import run_command as run_serve
from lora_jax.cli.train import add_arguments as add_train_arguments
from lora_jax.cli.train import run_command as run_training
from lora_jax.tools.serving_bench import add_arguments as add_bench_arguments
from lora_jax.tools.serving_bench import run_command as run_bench


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-jax", description="Multi-LoRA LLM serving, native to JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="build a tiny model and adapters, then serve them")
    demo.add_argument("--workdir", default=None,
                      help="where the demo model and adapters go (default: the user cache)")
    train = sub.add_parser("train", help="train LoRA adapters on a base model, save them as PEFT")
    add_train_arguments(train)
    bench = sub.add_parser("bench", help="serving benchmark: tokens/s, TTFT, compilations")
    add_bench_arguments(bench)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model and adapters")
    add_serve_arguments(serve)
    inspect = sub.add_parser("inspect-adapter", help="load a PEFT adapter and describe it")
    inspect.add_argument("path", help="local adapter folder or Hugging Face Hub id")
    inspect.add_argument("--max-lora-rank", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lora_jax.tools.demo import run_demo

        return run_demo(args.workdir)
    if args.command == "train":
        return run_training(args, parser)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "inspect-adapter":
        from lora_jax.lora.adapters import load_adapter

        adapter = load_adapter(args.path, max_lora_rank=args.max_lora_rank)
        print(f"{adapter.name}: rank {adapter.rank}, {adapter.num_layers} layers, "
              f"modules {sorted(adapter.modules)}")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
