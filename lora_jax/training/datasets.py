"""Training data: prompt/completion examples from text or JSONL, split, and padded into batches.

A JSONL line is {"prompt": ..., "completion": ...} (the loss covers the completion and the eos
after it) or {"text": ...} (the loss covers every token). A text file is one example per
non-empty line, loss on every token.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lora_jax.tokenizer import TextTokenizer


@dataclass(frozen=True)
class Example:
    """prompt_ids (bos included) are context only; completion_ids (eos included) are learned."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]


class Batch(NamedTuple):
    """Padded rows: tokens, positions (-1 = padding), targets [B, L] int32; weights [B, L]
    float32 (1 where targets[b, l] is a completion token to learn); slot [B] int32."""

    tokens: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    slot: np.ndarray


def read_records(path: str | Path) -> list[dict[str, str]]:
    """A .jsonl file -> its objects; any other file -> {"text": line} per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"dataset {path.name} line {number} is not JSON: {err}") from err
        if not isinstance(record, dict) or not ({"prompt", "completion"} <= set(record)
                                                or "text" in record):
            raise ValueError(f"dataset {path.name} line {number} needs 'prompt' and "
                             "'completion' keys, or a 'text' key")
        records.append(record)
    return records


def tokenize(records: Sequence[dict[str, str]], tokenizer: TextTokenizer,
             eos_token_id: int) -> list[Example]:
    """Encode records; prompts get the tokenizer's bos, completions end with eos."""
    examples = []
    for record in records:
        prompt, completion = ((record["prompt"], record["completion"]) if "text" not in record
                              else ("", record["text"]))
        completion_ids = tokenizer.encode(completion)
        if tokenizer.add_bos:  # encode() puts bos first; only the prompt starts a sequence
            completion_ids = completion_ids[1:]
        examples.append(Example(tuple(tokenizer.encode(prompt)),
                                (*completion_ids, eos_token_id)))
    return examples


def split(examples: Sequence[Example], eval_fraction: float,
          seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then (train, held-out eval); eval_fraction of 0 holds out nothing."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = round(len(examples) * eval_fraction)
    shuffled = [examples[i] for i in order]
    return shuffled[n_eval:], shuffled[:n_eval]


def make_batch(rows: Sequence[tuple[Example, int] | None], seq_len: int) -> Batch:
    """(example, slot) per row, None for an empty row; tokens past seq_len are cut off."""
    b = len(rows)
    tokens = np.zeros((b, seq_len), np.int32)
    positions = np.full((b, seq_len), -1, np.int32)
    targets = np.zeros((b, seq_len), np.int32)
    weights = np.zeros((b, seq_len), np.float32)
    slot = np.full(b, -1, np.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        example, slot[i] = row
        ids = (example.prompt_ids + example.completion_ids)[:seq_len + 1]
        n = min(len(ids), seq_len)
        tokens[i, :n] = ids[:n]
        positions[i, :n] = np.arange(n)
        targets[i, :len(ids) - 1] = ids[1:]
        # Position l predicts token l + 1: learn it when that token belongs to the completion.
        weights[i, max(len(example.prompt_ids) - 1, 0):len(ids) - 1] = 1.0
    return Batch(tokens, positions, targets, weights, slot)


def stack(batches: Sequence[Batch]) -> Batch:
    """[n] batches of the same shape -> one Batch with a leading [n] axis on every field."""
    return Batch(*(np.stack(fields) for fields in zip(*batches, strict=True)))


def shuffled_rows(examples: Sequence[Example], batch_size: int, slot: int,
                  seed: int) -> Iterator[list[tuple[Example, int]]]:
    """Endless batches of one adapter's examples: a fresh seeded shuffle every epoch."""
    if not examples:
        raise ValueError(f"adapter in slot {slot} has no training examples")
    rng = np.random.default_rng(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(rng.permutation(len(examples)).tolist())
        chosen, pending = pending[:batch_size], pending[batch_size:]
        yield [(examples[i], slot) for i in chosen]


def eval_rows(examples: Sequence[Example], batch_size: int,
              slot: int) -> Iterator[list[tuple[Example, int] | None]]:
    """One pass over held-out examples in order; the last batch is filled with empty rows."""
    for start in range(0, len(examples), batch_size):
        chunk: list[tuple[Example, int] | None] = [(e, slot) for e in
                                                   examples[start:start + batch_size]]
        yield chunk + [None] * (batch_size - len(chunk))
