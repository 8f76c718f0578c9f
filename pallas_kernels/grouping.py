"""Sort tokens into runs of one adapter, padded to whole blocks, and put results back.

Static shapes inside jit: the padded row count depends only on (T, S, block_t). Each adapter's
run (and the run of tokens without adapter) is padded on its own, and sum(ceil(n_g / bt)) <=
ceil(T / bt) + runs - 1 with at most S + 1 runs, so ceil(T / bt) + S blocks always suffice.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.blocks import cdiv


class Groups(NamedTuple):
    """rows [P] source token of each padded row (T = padding); position [T] row of each token;
    block_slot [P // block_t] adapter of each block, -1 for no adapter or padding."""

    rows: jax.Array
    position: jax.Array
    block_slot: jax.Array


def num_blocks(tokens: int, num_slots: int, block_t: int) -> int:
    """Blocks of block_t rows enough for any assignment of tokens to slots."""
    return max(1, min(cdiv(tokens, block_t) + num_slots, tokens))


def group_by_slot(slot: jax.Array, num_slots: int, block_t: int) -> Groups:
    """slot [T] int32 (-1 = none) -> Groups with P = num_blocks(T, S, block_t) * block_t rows."""
    tokens = slot.shape[0]
    n_blocks = num_blocks(tokens, num_slots, block_t)
    run = jnp.where(slot < 0, num_slots, slot).astype(jnp.int32)  # "no adapter" sorts last
    counts = jnp.bincount(run, length=num_slots + 1).astype(jnp.int32)
    padded = (counts + block_t - 1) // block_t * block_t
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(counts) - counts
    order = jnp.argsort(run, stable=True).astype(jnp.int32)
    sorted_run = run[order]
    index = jnp.arange(tokens, dtype=jnp.int32)
    dest = padded_start[sorted_run] + index - start[sorted_run]
    position = jnp.zeros(tokens, jnp.int32).at[order].set(dest)
    rows = jnp.full(n_blocks * block_t, tokens, jnp.int32).at[position].set(index)
    block_start = jnp.arange(n_blocks, dtype=jnp.int32) * block_t
    block_run = jnp.searchsorted(padded_end, block_start, side="right")
    block_slot = jnp.where(block_run < num_slots, block_run, -1).astype(jnp.int32)
    return Groups(rows=rows, position=position, block_slot=block_slot)


def gather_rows(x: jax.Array, groups: Groups) -> jax.Array:
    """x [T, D] -> [P, D] in grouped order; padding rows are zero."""
    return jnp.take(x, groups.rows, axis=0, mode="fill", fill_value=0)


def scatter_rows(x_grouped: jax.Array, groups: Groups) -> jax.Array:
    """[P, D] in grouped order -> [T, D] in token order (each token reads back its own row)."""
    return jnp.take(x_grouped, groups.position, axis=0)
