"""Decode shrink: each token gathers its own adapter's A tile (h[t] = x[t] @ a[:, slot[t]]).

Decode batches mix adapters token by token, so there is no shared matrix to feed tensor cores:
every program is one token times one tile of D_in, a multiply-and-reduce over its adapter's rows.
D_in is split across programs (split-K) so that even one token spreads over many SMs; the
partial sums, [T, D_in / block_k, R] float32, are added outside the kernel.
Reference: pallas_kernels.reference.shrink.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import blocks

# Elements of A one program reads: enough work per program, few enough registers.
_TILE_ELEMENTS = 8192


def _kernel(slot_ref, x_ref, a_ref, out_ref):
    """slot_ref [1], x_ref [block_k], a_ref [S, block_k, block_r] -> out_ref [block_r]."""
    slot = slot_ref[0]

    @pl.when(slot >= 0)
    def _():
        x = x_ref[...].astype(jnp.float32)
        a = a_ref[slot].astype(jnp.float32)  # the block spans every slot: index it here
        out_ref[...] = jnp.sum(x[:, None] * a, axis=0)

    @pl.when(slot < 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret", "poison"))
def gather_shrink(
    x: jax.Array, a: jax.Array, slot: jax.Array, *,
    block_k: int | None = None, interpret: bool = False, poison: bool = False,
) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 (-1 = none) -> h [T, R] float32."""
    tokens, d_in = x.shape
    num_slots, _, rank = a.shape
    block_r = blocks.pow2_divisor(rank, 64)
    x_bytes, a_bytes = x.dtype.itemsize, a.dtype.itemsize

    def footprint(k):  # x and a tiles and their float32 product
        return k * x_bytes + k * block_r * (a_bytes + 4)

    cap = min(512, _TILE_ELEMENTS // block_r)
    block_k, num_warps = blocks.fit_block(d_in, cap, block_k, "block_k", footprint, floor=1)
    n_k = d_in // block_k
    partial = blocks.launch(
        _kernel,
        name="lora_gather_shrink",
        num_warps=num_warps,
        grid=(tokens, n_k, rank // block_r),
        operands=(slot, x, a),
        in_specs=(
            pl.BlockSpec((1,), lambda t, k, r: (t,)),
            pl.BlockSpec((None, block_k), lambda t, k, r: (t, k)),
            pl.BlockSpec((num_slots, block_k, block_r), lambda t, k, r: (0, k, r)),
        ),
        out_spec=pl.BlockSpec((None, None, block_r), lambda t, k, r: (t, k, r)),
        out_shape=jax.ShapeDtypeStruct((tokens, n_k, rank), jnp.float32),
        interpret=interpret,
        poison=poison,
    )
    return jnp.sum(partial, axis=1)
