"""How the command line reports a failure: one line, `lora-jax <command>: error: <message>`.

A mistake a user can make (a bad path, adapter, model folder, data file or option value)
surfaces as ValueError, OSError (FileNotFoundError, PermissionError, ...), safetensors'
SafetensorError or CommandError; it exits 1. Anything else is a bug in lora-jax: it gets one
line too, marked as an internal error. --debug or LORA_JAX_DEBUG=1 re-raises instead, so the
traceback shows. Usage errors are argparse's own (exit 2) and never reach here.
"""

import os
import sys
from collections.abc import Callable


class CommandError(Exception):
    """A mistake in the user's input, already worded for the command line."""


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get("LORA_JAX_DEBUG", "").strip().lower() not in ("", "0", "false")


def _user_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (CommandError, ValueError, OSError, SafetensorError)


def one_line(err: BaseException) -> str:
    """The exception's message on one line (a multi-line message joined with '; ')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def run_reporting(prog: str, run: Callable[[], int], debug: bool) -> int:
    """run() -> its exit code; an exception -> one line on stderr and 1 (130 on Ctrl-C)."""
    try:
        return run()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _user_errors()):
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        else:
            print(f"{prog}: error: internal error ({type(err).__name__}: {one_line(err)}); "
                  "rerun with --debug (or LORA_JAX_DEBUG=1) for the traceback", file=sys.stderr)
        return 1
