"""Decode expand: each token adds its own adapter's B product (y[t] += h[t] @ b[slot[t]]).

One program per token and tile of output columns, a multiply-and-reduce over the rank. The
output aliases y, and a token without adapter (slot -1) is never touched, so it keeps y bit for
bit at no cost. The columns can be a slice of a wider y (col), so that the fused projections
(q|k|v, gate|up) write their slices in place with no concatenation.
Reference: pallas_kernels.reference.expand.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import blocks

_TILE_ELEMENTS = 8192


def _kernel(slot_ref, h_ref, b_ref, y_ref, out_ref):
    """slot_ref [1], h_ref [R], b_ref [S, R, block_n], y_ref [block_n] -> out_ref [block_n]."""
    slot = slot_ref[0]

    @pl.when(slot >= 0)
    def _():
        h = h_ref[...].astype(jnp.float32)
        b = b_ref[slot].astype(jnp.float32)
        delta = jnp.sum(h[:, None] * b, axis=0)
        out_ref[...] = (y_ref[...].astype(jnp.float32) + delta).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("col", "rank_index", "block_n", "interpret"))
def gather_expand(
    y: jax.Array, h: jax.Array, b: jax.Array, slot: jax.Array, *,
    col: int = 0, rank_index: int = 0, block_n: int | None = None, interpret: bool = False,
) -> jax.Array:
    """y [T, D], h [T, n*R], b [S, R, W], slot [T] -> y with y[:, col:col+W] += h_i @ b[slot].

    h_i = h[:, rank_index*R:(rank_index+1)*R]; the result has y's dtype.
    """
    tokens, width_y = y.shape
    num_slots, rank, width = b.shape
    blocks.check_rank(rank)
    # The tile must divide the offset of the slice as well as its width.
    h_bytes, b_bytes, y_bytes = h.dtype.itemsize, b.dtype.itemsize, y.dtype.itemsize

    def footprint(n):  # h, the b tile and its float32 product, the y tile and its sum
        return rank * h_bytes + rank * n * (b_bytes + 4) + n * (y_bytes + 4)

    cap = min(256, max(blocks.MIN_DOT, _TILE_ELEMENTS // rank))
    block_n, num_warps = blocks.fit_block(math.gcd(width, col), cap, block_n, "block_n",
                                          footprint, floor=1)
    col_block = col // block_n
    return blocks.launch(
        _kernel,
        name="lora_gather_expand",
        num_warps=num_warps,
        grid=(tokens, width // block_n),
        operands=(slot, h, b, y),
        in_specs=(
            pl.BlockSpec((1,), lambda t, j: (t,)),
            pl.BlockSpec((None, rank), lambda t, j: (t, rank_index)),
            pl.BlockSpec((num_slots, rank, block_n), lambda t, j: (0, 0, j)),
            pl.BlockSpec((None, block_n), lambda t, j: (t, col_block + j)),
        ),
        out_spec=pl.BlockSpec((None, block_n), lambda t, j: (t, col_block + j)),
        out_shape=jax.ShapeDtypeStruct((tokens, width_y), y.dtype),
        interpret=interpret,
        alias=3,
    )
