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

from lora_jax.sampler import Sampled, SamplingArrays, sample
from models.kv_cache import init_kv_cache

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
    """One row of a step: tokens at positions [start, start + len(tokens)) of a cache row."""

    tokens: list[int]
    start: int
    row: int
    slot: int  # adapter slot, -1 for the base model
    rope_scale: float
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    counter: int


# The per-row arrays of a step: (RowInput field, dtype, value in a padding row). Padding rows
# take no adapter, no rope scaling, and greedy sampling (so they never force a random draw).
_COLUMNS = (("row", np.int32, 0), ("slot", np.int32, -1), ("rope_scale", np.float32, 1.0),
            ("temperature", np.float32, 0.0), ("top_k", np.int32, 0), ("top_p", np.float32, 1.0),
            ("min_p", np.float32, 0.0), ("seed", np.uint32, 0), ("counter", np.int32, 0))


def _step(graphdef, state, stacks, kv, tokens, positions, rows, slots, rope_scale, last,
          sampling: SamplingArrays, num_logprobs: int, kv_window: int,
          lora_backend: str | None):
    model = nnx.merge(graphdef, state)
    hidden, kv = model(tokens, positions, kv, rows, stacks, slots, rope_scale,
                       lora_backend=lora_backend, kv_window=kv_window)
    final = hidden[jnp.arange(hidden.shape[0]), last]  # [B, D]: each row's last real token
    return sample(model.logits(final), sampling, num_logprobs), kv


class Runner:
    """Owns the model state and the KV cache; `run` executes one padded batch."""

    def __init__(self, model, *, num_rows: int, max_len: int, dtype,
                 lora_backend: str | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.kv = init_kv_cache(model.config, num_rows, max_len, dtype)
        self._step = jax.jit(
            functools.partial(_step, self.graphdef, lora_backend=lora_backend),
            static_argnames=("num_logprobs", "kv_window"), donate_argnames=("kv",))
        self.shapes_run: set[tuple[int, int, int, int]] = set()

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
        max_len = self.kv.max_len
        window = min(max_len, bucket(int(positions.max()) + 1, MIN_KV_WINDOW))
        self.shapes_run.add((b, width, num_logprobs, window))
        out, self.kv = self._step(self.state, stacks, self.kv, tokens, positions, cols["row"],
                                  cols["slot"], cols["rope_scale"], last, sampling,
                                  num_logprobs=num_logprobs, kv_window=window)
        return Sampled(*(np.asarray(x)[:n] for x in jax.device_get(out)))

    def compiled_count(self) -> int:
        """How many programs the step has compiled (one per shape bucket used)."""
        return self._step._cache_size()
