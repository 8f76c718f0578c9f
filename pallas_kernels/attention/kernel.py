"""Ragged paged attention on GPUs: one Pallas (Triton) kernel for decode rows and prefill chunks.

Scheme: each sequence's queries are cut into blocks of block_q tokens, and the grid is
(kv head, work item) over a static upper bound on the number of such blocks in the batch,
cdiv(T + n * (block_q - 1), block_q) with n = min(S, T) sequences that can hold a token (vLLM's
unified Triton attention bounds its grid likewise). XLA maps every work item to its sequence
and first query row before the call (a searchsorted over S + 1 offsets), so a decode row costs
one item, a 512-token chunk 512 / block_q items, and the items past the batch's queries return
at once; a grid over (sequence, kv head, query block) would launch S * T / block_q programs.

A program loads its block_q queries for all the GQA heads of its kv head (one [block_q * G, d]
matrix, G padded to a power of two), walks its sequence's block table in chunks of pages up to
the causal limit of its last query, gathers those pages from the pool in-kernel, and keeps an
online softmax (flash attention) in float32. Its stores are masked to its own sequence's rows
and the output starts as zeros, so padding tokens come out zero. A decode row fills one of the
block's block_q query rows: the rows are spare tensor-core work, while the page reads that bound
decode are the same. No split over the cache: one long sequence runs on KV programs. With a
sliding window a program starts at the first chunk its first query's window reaches.
Reference: pallas_kernels.attention.reference.ragged_paged_attention.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import blocks

# Finite, so a row with every score masked (padding rows) gives no NaN.
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
# Query rows ([block_q * G]) and cache positions per chunk a program aims for before the
# register budget (blocks.THREAD_TILE_BYTES) cuts them down.
_BLOCK_M, _BLOCK_K = 64, 64


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tiles(group: int, dim: int, block_size: int, itemsize: int,
          score_temps: int = 0) -> tuple[int, int, int]:
    """(block_q, pages per chunk, num_warps) for G query heads per kv head, from the register
    budget (blocks.THREAD_TILE_BYTES per thread).

    A program holds the float32 accumulator and the query tile [block_q * G, d] (the latter also
    in the dot's operand layout), scores and probabilities [block_q * G, chunk], a K or V tile
    [chunk, d], and for float32 the FMA dots' operands (blocks.dot_bytes). Preference: the full
    query block at 4 warps, then at 8 warps (the shape of Triton's flash attention), each with
    the largest chunk that fits; then smaller query blocks, down to the tensor cores' 16 rows.
    score_temps: extra [block_q * G, chunk] temporaries (a soft-cap, a window mask), at 16
    bytes an element each (as the sm_90a compile check measures them).
    """
    group_pad = _pow2_ceil(group)

    def footprint(block_q, pages):
        rows, chunk = block_q * group_pad, pages * block_size
        return (rows * dim * (4 + 2 * itemsize) + rows * chunk * (8 + itemsize + 16 * score_temps)
                + 2 * chunk * dim * itemsize + blocks.dot_bytes(rows, dim, chunk, itemsize)
                + blocks.dot_bytes(rows, chunk, dim, itemsize))

    def fits(block_q, pages, warps):
        return footprint(block_q, pages) <= blocks.THREAD_TILE_BYTES * 32 * warps

    block_q = max(1, _BLOCK_M // group_pad)
    most_pages = max(1, _BLOCK_K // block_size)
    for warps in (blocks.WARPS, blocks.MAX_WARPS):
        for pages in (most_pages >> i for i in range(most_pages.bit_length())):
            if fits(block_q, pages, warps):
                return block_q, pages, warps
    while block_q * group_pad > blocks.MIN_DOT and not fits(block_q, 1, blocks.MAX_WARPS):
        block_q //= 2
    return block_q, 1, blocks.warps_for(footprint(block_q, 1))


def work_items(query_start, kv_lens, num_seqs, *, tokens: int, block_q: int) -> jax.Array:
    """int32 [P, 4], per work item: sequence (-1 for an item past the batch's queries), first
    query row, end of the sequence's rows, cache position of the first row."""
    num_seqs_total = kv_lens.shape[0]
    items = blocks.cdiv(tokens + min(num_seqs_total, tokens) * (block_q - 1), block_q)
    live = jnp.arange(num_seqs_total) < num_seqs[0]
    q_len = jnp.where(live, query_start[1:] - query_start[:-1], 0)
    num_items = (q_len + block_q - 1) // block_q
    ends = jnp.cumsum(num_items)  # sequence i owns items ends[i] - num_items[i] .. ends[i] - 1
    item = jnp.arange(items, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, item, side="right").astype(jnp.int32)
    inside = seq < num_seqs_total
    seq = jnp.minimum(seq, num_seqs_total - 1)
    row = query_start[seq] + (item - ends[seq] + num_items[seq]) * block_q
    position = kv_lens[seq] - q_len[seq] + (row - query_start[seq])
    meta = [jnp.where(inside, seq, -1), row, query_start[seq] + q_len[seq], position]
    return jnp.stack([jnp.where(inside, m, -1 if i == 0 else 0) for i, m in enumerate(meta)],
                     axis=1).astype(jnp.int32)


def _kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, _zeros_ref, out_ref, *, block_q: int,
            pages: int, sm_scale: float, soft_cap: float | None, window: int | None):
    """meta_ref [4], tables_ref [S, MB], q_ref / out_ref [T + block_q, G_pad, d] (this program's
    kv head), k_ref / v_ref [num_blocks, block_size, d]; _zeros_ref is out_ref's initial value.
    window: a query at p sees cache positions in (p - window, p]; chunks wholly before the
    first query's window are never read. soft_cap: scores -> tanh(scores / cap) * cap."""
    seq, row, end, position = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]
    _, group_pad, dim = q_ref.shape
    num_blocks, block_size, _ = k_ref.shape
    rows, chunk = block_q * group_pad, pages * block_size

    @pl.when(seq >= 0)
    def _():
        q = q_ref[pl.ds(row, block_q)].reshape(rows, dim)
        # Matrix row m is query row m // G_pad: its cache position bounds what it may see.
        q_position = position + lax.broadcasted_iota(jnp.int32, (rows, chunk), 0) // group_pad
        kv_offset = lax.broadcasted_iota(jnp.int32, (rows, chunk), 1)
        # The last real query of the block sits at position + (its row - row); it needs every
        # cache position up to its own.
        context = position + jnp.minimum(row + block_q, end) - row
        num_chunks = jnp.minimum(pl.cdiv(context, chunk), tables_ref.shape[1] // pages)
        first = 0 if window is None else jnp.maximum(position - window + 1, 0) // chunk

        def step(c, carry):
            acc, m_prev, l_prev = carry
            ids = jnp.clip(tables_ref[seq, pl.ds(c * pages, pages)], 0, num_blocks - 1)
            k = k_ref[ids].reshape(chunk, dim)
            v = v_ref[ids].reshape(chunk, dim)
            scores = blocks.matmul_f32(q, k.T) * sm_scale
            if soft_cap is not None:
                scores = jnp.tanh(scores / soft_cap) * soft_cap
            visible = c * chunk + kv_offset <= q_position
            if window is not None:
                visible &= c * chunk + kv_offset > q_position - window
            scores = jnp.where(visible, scores, _MASK)
            m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
            correction = jnp.exp(m_prev - m_next)
            probs = jnp.exp(scores - m_next[:, None])
            l_next = l_prev * correction + jnp.sum(probs, axis=1)
            acc = acc * correction[:, None] + blocks.matmul_f32(probs, v)
            return acc, m_next, l_next

        init = (jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), _MASK, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, _, l_sum = lax.fori_loop(first, num_chunks, step, init)
        out = (acc / l_sum[:, None]).reshape(block_q, group_pad, dim).astype(out_ref.dtype)
        # Rows past this sequence's queries belong to the next sequence (or are padding).
        valid = row + lax.broadcasted_iota(jnp.int32, out.shape, 0) < end
        plgpu.store(out_ref.at[pl.ds(row, block_q)], out, mask=valid)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_q", "pages",
                                             "num_warps", "soft_cap", "sliding_window"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs, *,
                           sm_scale: float, interpret: bool = False, block_q: int | None = None,
                           pages: int | None = None, num_warps: int | None = None,
                           soft_cap: float | None = None,
                           sliding_window: int | None = None) -> jax.Array:
    """Shapes as pallas_kernels.attention.ragged_paged_attention; block_q, pages (per chunk) and
    num_warps override the tile rule (tests, tuning)."""
    tokens, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pages.shape
    group = heads // kv_heads
    rule = tiles(group, dim, block_size, k_pages.dtype.itemsize,
                 (soft_cap is not None) + (sliding_window is not None))
    block_q, pages, num_warps = block_q or rule[0], pages or rule[1], num_warps or rule[2]
    group_pad = _pow2_ceil(group)
    # Rows padded by one query block (so that every block's slice stays in bounds, in interpret
    # mode too, where an out-of-range dynamic slice would be clamped) and heads to G_pad.
    q4 = jnp.pad(q.reshape(tokens, kv_heads, group, dim),
                 ((0, block_q), (0, 0), (0, group_pad - group), (0, 0)))
    tables = jnp.pad(block_tables.astype(jnp.int32),
                     ((0, 0), (0, -block_tables.shape[1] % pages)))
    meta = work_items(query_start.astype(jnp.int32), kv_lens.astype(jnp.int32),
                      num_seqs.astype(jnp.int32), tokens=tokens, block_q=block_q)
    q_spec = pl.BlockSpec((q4.shape[0], None, group_pad, dim), lambda h, i: (0, h, 0, 0))
    page_spec = pl.BlockSpec((num_blocks, block_size, None, dim), lambda h, i: (0, 0, h, 0))
    out = blocks.launch(
        functools.partial(_kernel, block_q=block_q, pages=pages, sm_scale=sm_scale,
                          soft_cap=soft_cap, window=sliding_window),
        name="ragged_paged_attention",
        grid=(kv_heads, meta.shape[0]),
        operands=(meta, tables, q4, k_pages, v_pages, jnp.zeros_like(q4)),
        in_specs=(
            pl.BlockSpec((None, 4), lambda h, i: (i, 0)),
            pl.BlockSpec(tables.shape, lambda h, i: (0, 0)),
            q_spec, page_spec, page_spec, q_spec,
        ),
        out_spec=q_spec,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        interpret=interpret,
        alias=5,
        num_warps=num_warps,
    )
    return out[:tokens, :, :group].reshape(tokens, heads, dim)
