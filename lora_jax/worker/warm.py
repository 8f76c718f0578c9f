"""Warm runs: every program run once per branch a real step can take, before the first request.

XLA:CPU sets up each operation of a program (YNNPACK plans its matmuls) the first time that
operation runs. A program holds branches that only some steps take: the tiled LoRA backend's
tile counts (pallas_kernels.tiled), attention's decode and prefill layouts, the general sampler,
the top logprobs. Without warm runs, the first step to take a branch pays its set-up, and on a
server that step is every running stream's inter-token latency: the first many-adapter steps
after start-up ran several times slower than the same steps later (scripts/
bench_adapter_loads.py stall measures it). `warm_batches` lists the batches that together take
each branch one token bucket can reach; the runner runs them at start-up (Runner.warm).

The batches write keys and values into the pool's first blocks and sample tokens they never keep
(keeps=False): at start-up no sequence owns a block, and a sequence's first chunk starts its
history row over, so no request ever sees what they leave.
"""

from typing import NamedTuple

from lora_jax.worker.input_batch import BatchShape, RowInput, RowSampling, demand
from models.ragged import TILE
from pallas_kernels.tiled import tile_ladder, tile_rows

# A row that takes the general sampler, marks a prompt and starts its history row over.
_GENERAL = RowSampling(temperature=1.0, top_k=4, top_p=0.9, presence_penalty=0.5)


class WarmBatch(NamedTuple):
    """One warm step: its rows, whether its adapters use every LoRA site (else none), and
    the top logprobs it asks for."""

    rows: list[RowInput]
    sites: bool
    num_logprobs: int = 0


def warm_batches(shape: BatchShape, num_slots: int, block_size: int,
                 max_len: int) -> list[WarmBatch]:
    """The batches of one bucket: a base-model decode (every LoRA site skipped); the general
    sampler with a prompt and top logprobs (on one adapter: the compact branch); and, with
    adapter slots, for each tile count of the tiled backend's ladder that a batch of this shape
    can fill, a batch that fills it. Sequences stay within max_len positions."""
    chunk = _row([1] * max(1, min(shape.tokens - 1, 2 * TILE, max_len)), 0,
                 0 if num_slots else -1, block_size, _GENERAL)
    batches = [WarmBatch([_row([1], 0, -1, block_size)], sites=False),
               WarmBatch([chunk, _row([1], 1, chunk.slot, block_size)], sites=num_slots > 0,
                         num_logprobs=1)]
    if num_slots > 1:
        rows, low = tile_rows(shape.tokens), 0
        for high in tile_ladder(shape.tokens, num_slots):
            layout = _filling(shape, num_slots, rows, low, high, max_len)
            if layout is not None:
                batches.append(_tile_batch(layout, rows, block_size))
            low = high
    return [b for b in batches if shape.holds(*demand(b.rows))]


def _filling(shape: BatchShape, num_slots: int, rows: int, low: int, high: int,
             max_len: int) -> tuple[int, int, int] | None:
    """(decodes, chunks, size): single-token requests and requests of `size` tokens, each on
    a slot of its own, that fill a tile count in (low, high] (a chunk of (k - 1) * rows + 1
    tokens fills k tiles) and fit the shape; None when no such batch does."""
    most = min(num_slots, shape.requests)
    for per_chunk in range(2, max_len // rows + 2):
        size = (per_chunk - 1) * rows + 1
        if size > min(shape.tokens, max_len):
            return None
        for chunks in range(most + 1):
            decodes = max(low + 1 - chunks * per_chunk, 2 - chunks, 0)
            tiles = decodes + chunks * per_chunk
            if low < tiles <= high and decodes + chunks <= most and shape.holds(
                    decodes + chunks * size, decodes + chunks, chunks * -(-size // TILE)):
                return decodes, chunks, size
    return None


def _tile_batch(layout: tuple[int, int, int], rows: int, block_size: int) -> WarmBatch:
    decodes, chunks, size = layout
    batch = [_row([1], 1, slot, block_size) for slot in range(decodes)]
    batch += [_row([1] * size, 0, decodes + i, block_size) for i in range(chunks)]
    return WarmBatch(batch, sites=True)


def _row(tokens: list[int], start: int, slot: int, block_size: int,
         sampling: RowSampling | None = None) -> RowInput:
    blocks = -(-(start + len(tokens)) // block_size)
    general = sampling is not None
    return RowInput(tokens=tokens, start=start, row=0, block_table=list(range(blocks)),
                    sampling=sampling or RowSampling(), slot=slot, prompt=general,
                    fresh=general, keeps=False)
