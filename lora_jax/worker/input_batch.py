"""A scheduled step as host arrays: the ragged batch the compiled step takes.

The shapes come from a small ladder (see `BatchShape`): T tokens, a power of two, and what
follows from it (request entries, prefill tiles), so the whole set of programs is known before
the first request and compiled at start-up.
"""

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lora_jax.core.buckets import MIN_TOKENS, bucket
from lora_jax.sampling_params import MAX_HELD_TOKEN_IDS, MAX_LOGIT_BIAS
from models.ragged import TILE, RaggedMeta, chunk_pages

__all__ = ["MIN_TOKENS", "bucket", "RowSampling", "RowInput", "BatchShape", "ShapeLadder",
           "HostBatch", "build", "table_width"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RowSampling:
    """A sequence's sampling parameters as the step's per-request columns take them (fixed for
    the sequence's life, so the engine builds it once)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    bias_ids: tuple[int, ...] = ()  # logit_bias: ids and their biases, at most MAX_LOGIT_BIAS
    bias: tuple[float, ...] = ()
    min_tokens: int = 0  # until this many outputs, held_ids cannot be sampled
    held_ids: tuple[int, ...] = ()  # EOS and stop ids, at most MAX_HELD_TOKEN_IDS


GREEDY_ROW = RowSampling()


@dataclass(slots=True, kw_only=True)
class RowInput:
    """One request of a step: tokens at positions [start, start + len(tokens)), whose KV
    lives in the blocks of `block_table`; `row` indexes its sampling history."""

    tokens: list[int]
    start: int
    row: int
    block_table: list[int]
    sampling: RowSampling = GREEDY_ROW
    counter: int = 0  # tokens the sequence generated so far (folded into its random key)
    slot: int = -1  # adapter slot, -1 for the base model
    rope_scale: float = 1.0
    prompt: bool = False  # the tokens are prompt tokens (a prefill chunk) to mark as seen
    fresh: bool = False  # the sequence's first chunk: its row's history starts over
    keeps: bool = True  # the sampled token is kept (not a chunk before the prompt's last)
    src: int = -1  # >= 0: the first token is the previous step's sample of that row (on device)


# The per-request arrays: (field, dtype, value in a padding entry), of RowInput and of its
# RowSampling. Padding entries take no adapter, no rope scaling, and greedy sampling (so they
# never force a random draw). A new sampling option is a RowSampling field and a line here.
ROW_COLUMNS = (("row", np.int32, 0), ("slot", np.int32, -1), ("rope_scale", np.float32, 1.0),
               ("counter", np.int32, 0), ("prompt", np.bool_, False),
               ("fresh", np.bool_, False), ("keeps", np.bool_, False))
SAMPLING_COLUMNS = (("temperature", np.float32, 0.0), ("top_k", np.int32, 0),
                    ("top_p", np.float32, 1.0), ("min_p", np.float32, 0.0),
                    ("seed", np.uint32, 0), ("presence_penalty", np.float32, 0.0),
                    ("frequency_penalty", np.float32, 0.0),
                    ("repetition_penalty", np.float32, 1.0))
COLUMNS = ROW_COLUMNS + SAMPLING_COLUMNS
# Per-request lists, padded to a fixed width: (field of RowSampling, dtype, pad, width). A pad
# changes nothing: bias 0 added to token 0; held id -1 is no token. `hold` (a held row: fewer
# outputs than min_tokens before this step's sample) is computed per step from `counter`.
LIST_COLUMNS = (("bias_ids", np.int32, 0, MAX_LOGIT_BIAS),
                ("bias", np.float32, 0.0, MAX_LOGIT_BIAS),
                ("held_ids", np.int32, -1, MAX_HELD_TOKEN_IDS))


@dataclass(frozen=True)
class BatchShape:
    """The static shape of one step: T tokens, R request entries, NT prefill tiles."""

    tokens: int
    requests: int
    tiles: int

    def holds(self, tokens: int, requests: int, tiles: int) -> bool:
        """Does a batch that needs this many tokens, requests and prefill tiles fit?"""
        return self.tokens >= tokens and self.requests >= requests and self.tiles >= tiles


def demand(rows: list[RowInput]) -> tuple[int, int, int]:
    """What a batch of these rows needs of a shape: (tokens, requests, prefill tiles)."""
    tiles = sum(-(-len(r.tokens) // TILE) for r in rows if len(r.tokens) > 1)
    return sum(len(r.tokens) for r in rows), len(rows), tiles


@dataclass(frozen=True)
class ShapeLadder:
    """Every BatchShape the engine can run: one per token bucket from MIN_TOKENS up to
    max_num_batched_tokens. R = min(max_num_seqs, T) (a request has a token); tiles cover the
    tokens of up to max_prefill_seqs multi-token chunks (each wastes under one tile)."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_prefill_seqs: int

    def shape(self, tokens: int) -> BatchShape:
        return BatchShape(tokens, min(self.max_num_seqs, tokens),
                          tokens // TILE + min(self.max_prefill_seqs, max(1, tokens // 2)))

    def shapes(self) -> list[BatchShape]:
        top = bucket(self.max_num_batched_tokens, MIN_TOKENS)
        sizes, t = [], MIN_TOKENS
        while t <= top:
            sizes.append(t)
            t *= 2
        return [self.shape(t) for t in sizes]

    def fit(self, rows: list[RowInput]) -> BatchShape:
        """The smallest shape that holds these requests."""
        num_tokens, _, num_tiles = need = demand(rows)
        for shape in self.shapes():
            if shape.holds(*need):
                return shape
        raise ValueError(f"a step of {len(rows)} requests and {num_tokens} tokens "
                         f"({num_tiles} tiles) fits no compiled shape; the scheduler must keep "
                         f"to max_num_batched_tokens ({self.max_num_batched_tokens}), "
                         f"max_num_seqs and max_prefill_seqs ({self.max_prefill_seqs})")


def table_width(max_model_len: int, block_size: int) -> int:
    """Pages per block table: max_model_len's, rounded up to whole attention chunks."""
    pages = chunk_pages(block_size)
    needed = -(-max_model_len // block_size)
    return -(-needed // pages) * pages


class HostBatch(NamedTuple):
    """A step's arrays on the host (numpy); requests keep the order of their rows."""

    tokens: np.ndarray  # [T]
    src: np.ndarray  # [T] -1, or the previous step's row whose sampled token this token is
    meta: RaggedMeta
    columns: dict[str, np.ndarray]  # per-request columns (COLUMNS), [R] each
    logits_index: np.ndarray  # [R] the token whose hidden state samples


def build(rows: list[RowInput], shape: BatchShape, *, block_size: int, num_blocks: int,
          table_pages: int) -> HostBatch:
    """The step's host arrays for `rows`, padded to `shape`."""
    t, r, nt = shape.tokens, shape.requests, shape.tiles
    tokens = np.zeros(t, np.int32)
    src = np.full(t, -1, np.int32)
    positions = np.full(t, -1, np.int32)
    slot_mapping = np.full(t, num_blocks * block_size, np.int32)
    token_req = np.full(t, r, np.int32)
    tables = np.zeros((r, table_pages), np.int32)
    logits_index = np.zeros(r, np.int32)
    kv_lens = np.zeros(r, np.int32)  # cached tokens after this step; 0 for padding
    query_start = np.zeros(r + 1, np.int32)  # request i owns tokens [start_i, start_i+1)
    dec_token, dec_req = np.full(r, t, np.int32), np.zeros(r, np.int32)
    tile_start, tile_len, tile_req = (np.zeros(nt, np.int32) for _ in range(3))
    cols = {name: np.full(r, pad, dtype) for name, dtype, pad in COLUMNS}
    cols |= {name: np.full((r, width), pad, dtype) for name, dtype, pad, width in LIST_COLUMNS}
    cols["hold"] = np.zeros(r, np.bool_)
    cursor = num_dec = num_tiles = 0
    for i, row in enumerate(rows):
        n = len(row.tokens)
        span = slice(cursor, cursor + n)
        pos = np.arange(row.start, row.start + n, dtype=np.int32)
        table = np.asarray(row.block_table, np.int32)
        tokens[span] = row.tokens
        src[cursor] = row.src
        positions[span] = pos
        slot_mapping[span] = table[pos // block_size] * block_size + pos % block_size
        token_req[span] = i
        tables[i, :len(table)] = table[:table_pages]
        logits_index[i] = cursor + n - 1
        query_start[i] = cursor
        kv_lens[i] = row.start + n
        if n == 1:
            dec_token[num_dec], dec_req[num_dec] = cursor, i
            num_dec += 1
        else:
            for offset in range(0, n, TILE):
                tile_start[num_tiles] = cursor + offset
                tile_len[num_tiles] = min(TILE, n - offset)
                tile_req[num_tiles] = i
                num_tiles += 1
        for name, _, _ in ROW_COLUMNS:
            cols[name][i] = getattr(row, name)
        sampling = row.sampling
        for name, _, _ in SAMPLING_COLUMNS:
            cols[name][i] = getattr(sampling, name)
        if sampling.bias_ids or sampling.min_tokens:
            _fill_lists(cols, i, row)
        cursor += n
    query_start[len(rows):] = cursor
    meta = RaggedMeta(positions=positions, slot_mapping=slot_mapping, token_req=token_req,
                      tables=tables, dec_token=dec_token, dec_req=dec_req,
                      tile_start=tile_start, tile_len=tile_len, tile_req=tile_req,
                      query_start=query_start, kv_lens=kv_lens,
                      num_seqs=np.array([len(rows)], np.int32))
    return HostBatch(tokens, src, meta, cols, logits_index)


def _fill_lists(cols: dict[str, np.ndarray], i: int, row: RowInput) -> None:
    sampling = row.sampling
    for name, _, _, _ in LIST_COLUMNS:
        values = getattr(sampling, name)
        if values:
            cols[name][i, :len(values)] = values
    # The sample of this step is output number `counter` (pending ones counted): held while
    # fewer than min_tokens came before it.
    cols["hold"][i] = row.counter < sampling.min_tokens and bool(sampling.held_ids)
