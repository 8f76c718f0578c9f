"""Prefill expand: tokens sorted into blocks of one adapter, each block a real matmul.

A program adds h_block [block_t, R] @ b[slot] [R, block_n] to its tile of y on the tensor cores.
The output aliases y, and blocks without adapter are never touched (exact pass-through).
Reference: pallas_kernels.reference.expand with each row's slot = its block's slot.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import blocks


def _kernel(block_slot_ref, h_ref, b_ref, y_ref, out_ref):
    """block_slot_ref [1], h_ref [block_t, R], b_ref [S, R, block_n], y_ref [block_t, block_n]."""
    slot = block_slot_ref[0]

    @pl.when(slot >= 0)
    def _():
        delta = blocks.matmul_f32(h_ref[...], b_ref[slot])
        out_ref[...] = (y_ref[...].astype(jnp.float32) + delta).astype(out_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("block_t", "col", "rank_index", "block_n", "interpret")
)
def grouped_expand(
    y_grouped: jax.Array, h_grouped: jax.Array, b: jax.Array, block_slot: jax.Array, *,
    block_t: int, col: int = 0, rank_index: int = 0, block_n: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y_grouped [P, D], h_grouped [P, n*R], b [S, R, W], block_slot [P // block_t] -> [P, D].

    Columns col:col+W of each row get h_i @ b[block_slot]; h_i is slice rank_index of h.
    """
    rows, width_y = y_grouped.shape
    num_slots, rank, width = b.shape
    blocks.check_rank(rank)
    h_bytes, b_bytes, y_bytes = h_grouped.dtype.itemsize, b.dtype.itemsize, y_grouped.dtype.itemsize

    def footprint(n):  # h and b tiles, the y tile and its float32 sum
        return (block_t * rank * h_bytes + rank * n * b_bytes + block_t * n * (y_bytes + 4)
                + blocks.dot_bytes(block_t, rank, n, b_bytes))

    block_n, num_warps = blocks.fit_block(math.gcd(width, col), 128, block_n, "block_n", footprint)
    col_block = col // block_n
    return blocks.launch(
        _kernel,
        name="lora_grouped_expand",
        num_warps=num_warps,
        grid=(rows // block_t, width // block_n),
        operands=(block_slot, h_grouped, b, y_grouped),
        in_specs=(
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((block_t, rank), lambda i, j: (i, rank_index)),
            pl.BlockSpec((num_slots, rank, block_n), lambda i, j: (0, 0, j)),
            pl.BlockSpec((block_t, block_n), lambda i, j: (i, col_block + j)),
        ),
        out_spec=pl.BlockSpec((block_t, block_n), lambda i, j: (i, col_block + j)),
        out_shape=jax.ShapeDtypeStruct((rows, width_y), y_grouped.dtype),
        interpret=interpret,
        alias=3,
    )
