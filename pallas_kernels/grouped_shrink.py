"""Prefill shrink: tokens sorted into blocks of one adapter, each block a real matmul.

After grouping.group_by_slot every block of block_t rows belongs to one adapter (or none), so a
program computes x_block [block_t, D_in] @ a[:, slot] [D_in, block_r] on the tensor cores, looping
over D_in in tiles that Triton pipelines.
Reference: pallas_kernels.reference.shrink with each row's slot = its block's slot.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import blocks


def _kernel(block_slot_ref, x_ref, a_ref, out_ref, *, block_k: int):
    """block_slot_ref [1], x_ref [block_t, D_in], a_ref [S, D_in, block_r] -> [block_t, block_r]."""
    slot = block_slot_ref[0]

    @pl.when(slot >= 0)
    def _():
        def step(k, acc):
            cols = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            return acc + blocks.matmul_f32(x_ref[:, cols], a_ref[slot, cols, :])

        n_k = x_ref.shape[1] // block_k
        out_ref[...] = lax.fori_loop(0, n_k, step, jnp.zeros(out_ref.shape, jnp.float32))

    @pl.when(slot < 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_t", "block_k", "interpret", "poison"))
def grouped_shrink(
    x_grouped: jax.Array, a: jax.Array, block_slot: jax.Array, *, block_t: int,
    block_k: int | None = None, interpret: bool = False, poison: bool = False,
) -> jax.Array:
    """x_grouped [P, D_in], a [S, D_in, R], block_slot [P // block_t] -> h [P, R] float32."""
    rows, d_in = x_grouped.shape
    num_slots, _, rank = a.shape
    block_r = blocks.pow2_divisor(rank, 64)
    x_bytes, a_bytes = x_grouped.dtype.itemsize, a.dtype.itemsize

    def footprint(k):  # x and a tiles and the float32 accumulator
        return (block_t * k * x_bytes + k * block_r * a_bytes + block_t * block_r * 4
                + blocks.dot_bytes(block_t, k, block_r, a_bytes))

    block_k, num_warps = blocks.fit_block(d_in, 64, block_k, "block_k", footprint)
    return blocks.launch(
        functools.partial(_kernel, block_k=block_k),
        name="lora_grouped_shrink",
        num_warps=num_warps,
        grid=(rows // block_t, rank // block_r),
        operands=(block_slot, x_grouped, a),
        in_specs=(
            pl.BlockSpec((1,), lambda i, r: (i,)),
            pl.BlockSpec((block_t, d_in), lambda i, r: (i, 0)),
            pl.BlockSpec((num_slots, d_in, block_r), lambda i, r: (0, 0, r)),
        ),
        out_spec=pl.BlockSpec((block_t, block_r), lambda i, r: (i, r)),
        out_shape=jax.ShapeDtypeStruct((rows, rank), jnp.float32),
        interpret=interpret,
        poison=poison,
        num_stages=3,
    )
