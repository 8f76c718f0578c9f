"""The `lora-jax` command line: parse, dispatch, and report a failure in one line.

Each command module has add_arguments(parser), an optional check(args, parser) for option
values argparse cannot check alone (usage errors, exit 2), and run(args) -> exit code, whose
exceptions errors.run_reporting turns into `lora-jax <command>: error: <message>` (exit 1).
Nothing heavy is imported until a command runs, so a mistake is reported fast.
"""

import argparse
import importlib
import sys

from lora_jax.cli.errors import debug_requested, run_reporting
from lora_jax.cli.options import HelpFormatter

# command -> (module in lora_jax.cli, help line)
COMMANDS = {
    "demo": ("demo", "build a tiny model and adapters, then serve them"),
    "train": ("train", "train LoRA adapters on a base model, save them as PEFT"),
    "bench": ("bench", "serving benchmark: tokens/s, TTFT, compilations"),
    "serve": ("serve", "OpenAI-compatible HTTP server for a model and adapters"),
    "inspect-adapter": ("inspect_adapter", "load a PEFT adapter and describe it; with --model, "
                                           "check it fits that base model"),
}
# The bench's options come with its module, which imports JAX: only added when it runs.
_HEAVY_OPTIONS = {"bench"}
_DEBUG_HELP = "show the full traceback of an error (or set LORA_JAX_DEBUG=1)"


def _module(command: str):
    return importlib.import_module(f"lora_jax.cli.{COMMANDS[command][0]}")


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` is the one about to run (its heavy options are added only then)."""
    parser = argparse.ArgumentParser(
        prog="lora-jax", description="Multi-LoRA LLM serving, native to JAX.",
        formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line,
                           formatter_class=HelpFormatter)
        # Also accepted after the command; SUPPRESS keeps an absent one from unsetting it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=_DEBUG_HELP)
        if name not in _HEAVY_OPTIONS or name == command:
            _module(name).add_arguments(p)
        p.set_defaults(subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = _module(args.command)
    if hasattr(module, "check"):
        module.check(args, args.subparser)
    return run_reporting(f"lora-jax {args.command}", lambda: module.run(args),
                         debug_requested(args.debug))


if __name__ == "__main__":
    sys.exit(main())
