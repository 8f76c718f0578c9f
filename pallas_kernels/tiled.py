"""The "tiled" backend (plain XLA, the CPU default): a step's LoRA cost follows its tokens and the
adapters it uses, never the number of slots.

The dense backend multiplies every token by every slot. Here the step's slot ids are looked at
once (step_meta, built once per step and read by every layer, as vLLM's punica wrapper does),
and each LoRA site runs one of a few static branches (lax.switch on an index the metadata holds):
  compact K (a step with at most K <= COMPACT_MAX distinct adapters, K in COMPACT_LADDER): gather
          those K adapters, run the dense form over them alone ([T, D] @ [D, K*R]);
  tiles n (more adapters): the tokens sorted by slot into tiles of tile_rows(T) rows, each run of
          one adapter padded to whole tiles (pallas_kernels.grouping), the first n tiles
          multiplied by their own gathered adapter (a batched [n, tm, D] @ [n, D, R]). The
          ladder of n doubles from ceil(T / tm) to the static bound, so the work done is at most
          twice the tiles the step fills.
  skip (the last branch): a LoRA site none of the step's adapters uses (for_site) adds nothing.
Every branch is compiled with the step (no new program); only the chosen one runs. Tokens of
slot -1 sort last, so they fill no tile and get exactly y back.
Reference: pallas_kernels.reference.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dense, grouping
from pallas_kernels.bits import take_rows
from pallas_kernels.blocks import cdiv

# Steps with at most this many distinct adapters take the compact branches (their FLOPs grow
# with K: scripts/bench_kernels.py --forms shows tiles win from a few adapters on, and every
# branch adds to the step's compile time).
COMPACT_MAX = 1
COMPACT_LADDER = (1,)
MAX_TILE_ROWS = 32


class LoraMeta(NamedTuple):
    """What every LoRA site of one step reads; built once by step_meta.

    slot [T] int32 (-1 = none); groups: the tokens sorted into tiles of one adapter (rows [P],
    position [T], block_slot [N]); distinct [COMPACT_MAX] the step's first distinct slots;
    token_k [T] each token's index in distinct (-1: none); branch [] int32 the branch to run.
    """

    slot: jax.Array
    groups: grouping.Groups
    distinct: jax.Array
    token_k: jax.Array
    branch: jax.Array


def tile_rows(tokens: int) -> int:
    """Rows per tile: a power of two near T / 16 (decode: a few tokens per adapter), at most 32."""
    rows = 1
    while rows * 16 <= tokens and rows < MAX_TILE_ROWS:
        rows *= 2
    return rows


def tile_ladder(tokens: int, num_slots: int) -> tuple[int, ...]:
    """The tile counts the tile branches compute: doubling from the fewest any step fills
    (ceil(T / tm)) up to the bound every step fits in (grouping.num_blocks)."""
    rows = tile_rows(tokens)
    top = grouping.num_blocks(tokens, num_slots, rows)
    ladder, n = [], max(1, cdiv(tokens, rows))
    while n < top:
        ladder.append(n)
        n *= 2
    return (*ladder, top)


def step_meta(slot: jax.Array, num_slots: int) -> LoraMeta:
    """slot [T] int32 (-1 = none), S slots -> LoraMeta; a handful of [T]- and [S]-sized ops."""
    tokens = slot.shape[0]
    rows = tile_rows(tokens)
    groups = grouping.group_by_slot(slot, num_slots, rows)
    run = jnp.where(slot < 0, num_slots, slot).astype(jnp.int32)
    counts = jnp.bincount(run, length=num_slots + 1)[:num_slots].astype(jnp.int32)
    present = counts > 0
    num_distinct = jnp.sum(present, dtype=jnp.int32)
    num_tiles = jnp.sum((counts + rows - 1) // rows, dtype=jnp.int32)
    distinct = jnp.nonzero(present, size=COMPACT_MAX, fill_value=0)[0].astype(jnp.int32)
    index = jnp.cumsum(present, dtype=jnp.int32) - 1  # slot -> its place among the distinct
    token_k = jnp.where(slot >= 0, index[jnp.maximum(slot, 0)], -1).astype(jnp.int32)
    compact = jnp.searchsorted(jnp.asarray(COMPACT_LADDER), num_distinct)
    tiles = len(COMPACT_LADDER) + jnp.searchsorted(
        jnp.asarray(tile_ladder(tokens, num_slots)), num_tiles)
    branch = jnp.where(num_distinct <= COMPACT_MAX, compact, tiles).astype(jnp.int32)
    return LoraMeta(slot.astype(jnp.int32), groups, distinct, token_k, branch)


# lax.switch clamps its index: any index past the branches runs the last one, the skip.
_SKIP = 1 << 20


def for_site(meta: LoraMeta, used: jax.Array) -> LoraMeta:
    """The step's metadata for one LoRA site: `used` [] bool false (no adapter of the step
    uses the site) turns its shrink and expand into the skip branch."""
    return meta._replace(branch=jnp.where(used, meta.branch, _SKIP).astype(jnp.int32))


def _tiles(meta: LoraMeta, n: int) -> tuple[jax.Array, jax.Array, int]:
    """The first n tiles: (source token of each row [n*tm], adapter of each tile [n], tm)."""
    rows = meta.groups.rows.shape[0] // meta.groups.block_slot.shape[0]
    return meta.groups.rows[:n * rows], jnp.maximum(meta.groups.block_slot[:n], 0), rows


def _unsort(tiled: jax.Array, meta: LoraMeta) -> jax.Array:
    """[n*tm, W] rows in tile order -> [T, W] in token order; tokens past the tiles get 0."""
    return jnp.take(tiled, meta.groups.position, axis=0, mode="fill", fill_value=0)


def _shrink_branches(x: jax.Array, a: jax.Array, meta: LoraMeta) -> list:
    num_slots, d_in, rank = a.shape
    tokens = x.shape[0]

    def compact(k):
        def run():
            used = take_rows(a, meta.distinct[:k])  # [K, D_in, R]
            used = used[0] if k == 1 else jnp.transpose(used, (1, 0, 2)).reshape(d_in, k * rank)
            h = jnp.dot(x, used, preferred_element_type=jnp.float32).reshape(tokens, k, rank)
            return jnp.einsum("tkr,tk->tr", h, dense.one_hot(meta.token_k, k))
        return run

    def tiles(n):
        def run():
            rows, tile_slot, tm = _tiles(meta, n)
            x_t = take_rows(x, rows, fill=True).reshape(n, tm, d_in)
            a_t = take_rows(a, tile_slot)  # [n, D_in, R]
            h = jnp.einsum("ntd,ndr->ntr", x_t, a_t, preferred_element_type=jnp.float32)
            return _unsort(h.reshape(n * tm, rank), meta)
        return run

    def skip():
        return jnp.zeros((tokens, rank), jnp.float32)

    return ([compact(k) for k in COMPACT_LADDER]
            + [tiles(n) for n in tile_ladder(tokens, num_slots)] + [skip])


def shrink(x: jax.Array, a: jax.Array, slot: jax.Array, meta: LoraMeta | None = None
           ) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 -> h [T, R] float32."""
    meta = step_meta(slot, a.shape[0]) if meta is None else meta
    h = jax.lax.switch(meta.branch, _shrink_branches(x, a, meta))
    return jnp.where(meta.slot[:, None] >= 0, h, 0.0)


def _expand_branches(h: jax.Array, bs: Sequence[jax.Array], meta: LoraMeta) -> list:
    num_slots, rank = bs[0].shape[:2]
    tokens = h.shape[0]
    h = h.astype(jnp.float32)
    slices = [h[:, i * rank:(i + 1) * rank] for i in range(len(bs))]

    def compact(k):
        def run():
            mask = dense.one_hot(meta.token_k, k)[:, :, None]
            return tuple(
                jnp.dot((mask * h_i[:, None, :]).reshape(tokens, k * rank).astype(b.dtype),
                        take_rows(b, meta.distinct[:k]).reshape(k * rank, b.shape[-1]),
                        preferred_element_type=jnp.float32)
                for h_i, b in zip(slices, bs, strict=True))
        return run

    def tiles(n):
        def run():
            rows, tile_slot, tm = _tiles(meta, n)
            out = []
            for h_i, b in zip(slices, bs, strict=True):  # the fused slices: a static handful
                h_t = jnp.take(h_i, rows, axis=0, mode="fill", fill_value=0)
                b_t = take_rows(b, tile_slot)  # [n, R, W]
                d = jnp.einsum("ntr,nrw->ntw", h_t.reshape(n, tm, rank).astype(b.dtype), b_t,
                               preferred_element_type=jnp.float32)
                out.append(_unsort(d.reshape(n * tm, b.shape[-1]), meta))
            return tuple(out)
        return run

    def skip():
        return tuple(jnp.zeros((tokens, b.shape[-1]), jnp.float32) for b in bs)

    return ([compact(k) for k in COMPACT_LADDER]
            + [tiles(n) for n in tile_ladder(tokens, num_slots)] + [skip])


def _expand_split(y: jax.Array, h: jax.Array, bs: tuple, meta: LoraMeta, dtype
                  ) -> list[jax.Array]:
    """The slices of y [T, sum W_i], slice i plus h_i @ bs[i][slot], each in dtype.

    The adds sit inside the switch, so a step whose adapters skip this site only splits and
    casts y: no zero delta the size of y is built and added (at 1024 tokens that was about a
    fifth of a q/v adapter's cost in every MLP). Slot -1 rows are y's exactly."""
    bounds = np.cumsum([b.shape[-1] for b in bs[:-1]]).tolist()
    valid = meta.slot[:, None] >= 0

    def adding(branch):
        def run():
            return tuple(jnp.where(valid, y_i.astype(jnp.float32) + d, y_i).astype(dtype)
                         for y_i, d in zip(jnp.split(y, bounds, axis=-1), branch(), strict=True))
        return run

    def split():
        return tuple(y_i.astype(dtype) for y_i in jnp.split(y, bounds, axis=-1))

    branches = _expand_branches(h, bs, meta)
    return list(jax.lax.switch(meta.branch, [adding(b) for b in branches[:-1]] + [split]))


def expand_sliced(y: jax.Array, h: jax.Array, bs: Sequence[jax.Array], slot: jax.Array,
                  meta: LoraMeta | None = None) -> jax.Array:
    """y [T, sum W_i], h [T, n*R], bs n arrays [S, R, W_i] -> y + per-slice h_i @ b_i[slot]."""
    meta = step_meta(slot, bs[0].shape[0]) if meta is None else meta
    parts = _expand_split(y, h, tuple(bs), meta, y.dtype)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def apply_sliced(y: jax.Array, x: jax.Array, a: jax.Array, bs: Sequence[jax.Array],
                 slot: jax.Array, meta: LoraMeta | None = None) -> jax.Array:
    """shrink then expand_sliced, both on one step's metadata."""
    meta = step_meta(slot, a.shape[0]) if meta is None else meta
    return expand_sliced(y, shrink(x, a, slot, meta), bs, slot, meta)


def apply_split(y: jax.Array, x: jax.Array, a: jax.Array, bs: Sequence[jax.Array],
                slot: jax.Array, meta: LoraMeta | None = None, dtype=None) -> list[jax.Array]:
    """apply_sliced as its slices [T, W_i], each cast to dtype (default y's): what a fused
    projection hands on to its parts, with no concatenation to undo."""
    meta = step_meta(slot, a.shape[0]) if meta is None else meta
    dtype = y.dtype if dtype is None else dtype
    return _expand_split(y, shrink(x, a, slot, meta), tuple(bs), meta, dtype)
