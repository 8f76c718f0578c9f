"""Plain-JAX definitions of the LoRA kernels: the function every other backend must equal.

Shapes: T tokens, S adapter slots, D_in / D_out feature sizes, R (padded) rank. Stacks have
the slot axis first: shrink stacks a [S, D_in, R], expand stacks b [S, R, D_out].
A slot index of -1 means "no adapter": that token's LoRA term is exactly zero.
"""

import jax
import jax.numpy as jnp


def _valid(slot: jax.Array) -> jax.Array:
    return slot >= 0


def shrink(x: jax.Array, a: jax.Array, slot: jax.Array) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 -> h [T, R] float32: x[t] @ a[slot[t]]."""
    a_t = jnp.take(a, jnp.maximum(slot, 0), axis=0)  # [T, D_in, R]
    h = jnp.einsum("td,tdr->tr", x, a_t, preferred_element_type=jnp.float32)
    return jnp.where(_valid(slot)[:, None], h, 0.0)


def expand(y: jax.Array, h: jax.Array, b: jax.Array, slot: jax.Array) -> jax.Array:
    """y [T, D_out], h [T, R], b [S, R, D_out], slot [T] -> y + h @ b[slot] in y's dtype."""
    b_t = jnp.take(b, jnp.maximum(slot, 0), axis=0)  # [T, R, D_out]
    delta = jnp.einsum("tr,tro->to", h.astype(jnp.float32), b_t, preferred_element_type=jnp.float32)
    out = (y.astype(jnp.float32) + delta).astype(y.dtype)
    return jnp.where(_valid(slot)[:, None], out, y)
