"""`lora-jax demo [--workdir DIR]`: build a tiny model and adapters, then serve them."""

import argparse
import os
from pathlib import Path

from lora_jax.cli.errors import CommandError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None,
                        help="where the demo model and adapters go (default: the user cache)")


def _check_workdir(path: str) -> None:
    """A usable --workdir before JAX loads: a folder we can write (made if missing)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"--workdir {path!r} is a file; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--workdir {path!r} cannot be created ({err.strerror or err})") \
            from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"--workdir {path!r} is not writable")


def run(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        _check_workdir(args.workdir)
    from lora_jax.tools.demo import run_demo

    return run_demo(args.workdir)
