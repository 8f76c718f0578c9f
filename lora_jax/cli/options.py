"""Option types (a bad value is an argparse usage error, exit 2) and cheap checks of the paths
a command reads, run before anything heavy is imported. Imports no JAX."""

import argparse
import json
import math
import textwrap
from pathlib import Path

from lora_jax.cli.errors import CommandError


class HelpFormatter(argparse.HelpFormatter):
    """Help lines wrapped between words only (never inside `gate_proj` or `--xla_...`), and
    each option's default shown unless its help already names it."""

    def _split_lines(self, text, width):
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False
                or default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(kind: type, low, strict: bool, wanted: str):
    def check(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    check.__name__ = wanted  # argparse names a type by it in some messages
    return check


positive_int = _at_least(int, 1, False, "a positive integer")
nonnegative_int = _at_least(int, 0, False, "an integer >= 0")
positive_float = _at_least(float, 0.0, True, "a positive number")
nonnegative_float = _at_least(float, 0.0, False, "a number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def port(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [0, 65535], got {value}")
    return value


def check_model_folder(path: str) -> Path:
    """A local Hugging Face model folder whose config.json is a JSON object; CommandError
    saying what is wrong otherwise. The weights are checked when the model loads."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CommandError(f"model folder {path!r} does not exist")
    if not folder.is_dir():
        raise CommandError(f"model path {path!r} is a file; pass the folder that holds "
                           "config.json and model.safetensors")
    config = folder / "config.json"
    if not config.is_file():
        raise CommandError(f"model folder {path!r} has no config.json (not a Hugging Face "
                           "model folder)")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CommandError(f"{config} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CommandError(f"{config} must hold a JSON object")
    return folder
