"""Runs one scheduled batch on the device: pads it to a shape bucket and calls the jitted step.

The step is a pure function of (model state, adapter stacks, KV cache, batch arrays): the model
is split once with nnx.split and merged inside jit, the KV cache is donated, and sampling runs
in the same compiled function, so the host reads back only token ids (and logprobs if asked).
"""

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.worker.sampler import History, Sampled, SamplingArrays, SamplingMode, mode_of, sample
from models.kv_cache import init_paged_kv_cache

# Smallest buckets: a few padded decode rows or prompt tokens cost little next to another
# compiled program (reading the weights dominates a small step), so small batches share a shape.
# Prefill rows are not padded up: an idle row there would cost a whole padded prompt.
MIN_DECODE_ROWS = 8
MIN_PREFILL_WIDTH = 16
# Attention reads each row's cache up to a power-of-two window over the batch's furthest
# position, not max_model_len: short contexts cost what they use, at one program per window.
MIN_KV_WINDOW = 64


def bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= max(n, smallest): the padded size that a batch dimension compiles at."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


@dataclass
class RowInput:
    """One sequence of a step: tokens at positions [start, start + len(tokens)), whose KV
    lives in the blocks of `block_table`; `row` indexes its sampling history."""

    tokens: list[int]
    start: int
    row: int
    block_table: list[int]
    slot: int  # adapter slot, -1 for the base model
    rope_scale: float
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    counter: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    prompt: bool = False  # the tokens are prompt tokens (a prefill chunk) to mark as seen
    fresh: bool = False  # the sequence's first chunk: its row's history starts over
    keeps: bool = True  # the sampled token is kept (not a chunk before the prompt's last)


# The per-row arrays of a step: (RowInput field, dtype, value in a padding row). Padding rows
# take no adapter, no rope scaling, and greedy sampling (so they never force a random draw).
_COLUMNS = (("row", np.int32, 0), ("slot", np.int32, -1), ("rope_scale", np.float32, 1.0),
            ("temperature", np.float32, 0.0), ("top_k", np.int32, 0), ("top_p", np.float32, 1.0),
            ("min_p", np.float32, 0.0), ("seed", np.uint32, 0), ("counter", np.int32, 0),
            ("presence_penalty", np.float32, 0.0), ("frequency_penalty", np.float32, 0.0),
            ("repetition_penalty", np.float32, 1.0), ("prompt", np.bool_, False),
            ("fresh", np.bool_, False), ("keeps", np.bool_, False))


def _step(graphdef, state, stacks, kv, history: History, tokens, positions, rows, tables,
          slots, rope_scale, last, prompt, fresh, keeps, sampling: SamplingArrays,
          num_logprobs: int, kv_window: int, mode: SamplingMode, has_prompt: bool,
          lora_backend: str | None):
    model = nnx.merge(graphdef, state)
    hidden, kv = model(tokens, positions, kv, tables, stacks, slots, rope_scale,
                       lora_backend=lora_backend, kv_window=kv_window)
    final = hidden[jnp.arange(hidden.shape[0]), last]  # [B, D]: each row's last real token
    if has_prompt:  # a decode-only step has no prompt to mark and no row to reset
        history = _see_prompt(history, tokens, positions, rows, prompt, fresh)
    out = sample(model.logits(final), sampling, num_logprobs, history, rows, mode)
    # Rows that drop their sample (padding, a prompt chunk before the last) index past the end.
    kept = jnp.where(keeps, rows, history.output_counts.shape[0])
    counts = history.output_counts.at[kept, out.tokens].add(1, mode="drop")
    return out, kv, History(counts, history.in_prompt)


def _see_prompt(history: History, tokens, positions, rows, prompt, fresh) -> History:
    """A sequence's first chunk makes its row forget the previous sequence; prompt tokens
    are marked seen. Padding (position -1) and decode rows change nothing."""
    num_rows = history.output_counts.shape[0]
    starts = jnp.where(fresh, rows, num_rows)
    counts = history.output_counts.at[starts].set(0, mode="drop")
    in_prompt = history.in_prompt.at[starts].set(False, mode="drop")
    marked = jnp.where(prompt[:, None] & (positions >= 0), rows[:, None], num_rows)
    return History(counts, in_prompt.at[marked, tokens].set(True, mode="drop"))


class Runner:
    """Owns the model state, the KV cache and the penalty history (output counts and prompt
    marks, [rows, vocab] each: 5 bytes per row and vocabulary entry); `run` executes one
    padded batch."""

    def __init__(self, model, *, num_rows: int, max_len: int, num_blocks: int,
                 block_size: int, dtype, lora_backend: str | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.max_len, self.block_size = max_len, block_size
        self.kv = init_paged_kv_cache(model.config, num_blocks, block_size, dtype)
        vocab = model.config.vocab_size
        self.history = History(jnp.zeros((num_rows, vocab), jnp.int32),
                               jnp.zeros((num_rows, vocab), jnp.bool_))
        self._step = jax.jit(
            functools.partial(_step, self.graphdef, lora_backend=lora_backend),
            static_argnames=("num_logprobs", "kv_window", "mode", "has_prompt"),
            donate_argnames=("kv", "history"))
        # Every static key the step compiled for: shape bucket, logprobs, window, sampling mode.
        self.shapes_run: set[tuple] = set()

    def run(self, rows: list[RowInput], stacks, num_logprobs: int = 0) -> Sampled:
        """Sample one token per row (for the last of its tokens); returns host numpy arrays."""
        n = len(rows)
        longest = max(len(r.tokens) for r in rows)
        width = 1 if longest == 1 else bucket(longest, MIN_PREFILL_WIDTH)
        b = bucket(n, MIN_DECODE_ROWS if width == 1 else 1)
        tokens = np.zeros((b, width), np.int32)
        positions = np.full((b, width), -1, np.int32)
        last = np.zeros(b, np.int32)
        cols = {name: np.full(b, pad, dtype) for name, dtype, pad in _COLUMNS}
        for i, r in enumerate(rows):
            tokens[i, : len(r.tokens)] = r.tokens
            positions[i, : len(r.tokens)] = np.arange(r.start, r.start + len(r.tokens))
            last[i] = len(r.tokens) - 1
            for name in cols:
                cols[name][i] = getattr(r, name)
        sampling = SamplingArrays(*(cols[name] for name in SamplingArrays._fields))
        window = min(self.max_len, bucket(int(positions.max()) + 1, MIN_KV_WINDOW))
        # Only the blocks the window covers; padding entries (block 0) are never attended.
        tables = np.zeros((b, -(-window // self.block_size)), np.int32)
        for i, r in enumerate(rows):
            used = r.block_table[:tables.shape[1]]
            tables[i, :len(used)] = used
        mode, has_prompt = mode_of(sampling), bool(cols["prompt"].any() or cols["fresh"].any())
        self.shapes_run.add((b, width, num_logprobs, window, mode, has_prompt))
        out, self.kv, self.history = self._step(
            self.state, stacks, self.kv, self.history, tokens, positions, cols["row"], tables,
            cols["slot"], cols["rope_scale"], last, cols["prompt"], cols["fresh"],
            cols["keeps"], sampling,
            num_logprobs=num_logprobs, kv_window=window, mode=mode, has_prompt=has_prompt)
        return Sampled(*(np.asarray(x)[:n] for x in jax.device_get(out)))

    def compiled_count(self) -> int:
        """How many programs the step has compiled (one per shape bucket used)."""
        return self._step._cache_size()
