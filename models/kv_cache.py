"""The KV cache: one row per running sequence, indexed by token position.

Layout: k, v [layers, rows, max_len, kv_heads, head_dim]. A token at position p of a sequence
in row r lives at [:, r, p]. A row is reused by a new sequence without clearing: attention only
reads entries at positions <= the query's own, and the new sequence has written all of those.

A 16-bit float cache (bfloat16, float16) is stored as its uint16 bits by default: XLA:CPU
scatters a 16-bit float array by converting all of it to float32 and back, which per layer costs
more than the layer's matmuls, and a bitcast of the donated cache on the way in and out of the
step is a copy of all of it. Integers of the same width scatter in place; reads bitcast just the
window. Bits carry no gradient, so a cache that is differentiated through (training) is made
with bits=False.
"""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from models.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """k, v [layers, rows, max_len, kv_heads, head_dim] holding values of `dtype`, or their
    uint16 bits for a 16-bit float (see init_kv_cache); read_layer gives `dtype` back."""

    k: jax.Array
    v: jax.Array
    dtype: str = field(default="float32", metadata={"static": True})

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_kv_cache(config: LlamaConfig, num_rows: int, max_len: int, dtype="float32", *,
                  bits: bool = True) -> KVCache:
    """Zeros of [layers, num_rows, max_len, kv_heads, head_dim] for k and for v; a 16-bit float
    dtype is stored as uint16 bits unless bits=False (needed to differentiate through it)."""
    for name, value in (("num_rows", num_rows), ("max_len", max_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shape = (config.num_hidden_layers, num_rows, max_len, config.num_key_value_heads,
             config.head_dim)
    dtype = jnp.dtype(dtype)
    stored = jnp.uint16 if bits and dtype.itemsize == 2 else dtype
    return KVCache(k=jnp.zeros(shape, stored), v=jnp.zeros(shape, stored), dtype=dtype.name)


def write_layer(cache: jax.Array, layer: int | jax.Array, rows: jax.Array,
                positions: jax.Array, new: jax.Array, dtype) -> jax.Array:
    """cache [layers, rows, max_len, H, d] (KVCache storage of `dtype`); new [B, L, H, d]
    -> new as `dtype`, written at [layer, rows[b], positions[b, l]].

    Padding (position -1) and positions past max_len are dropped, not wrapped.
    """
    max_len = cache.shape[2]
    index = jnp.where(positions < 0, max_len, positions)
    new = new.astype(dtype)
    if cache.dtype != new.dtype:
        new = jax.lax.bitcast_convert_type(new, cache.dtype)
    return cache.at[layer, rows[:, None], index].set(new, mode="drop")


def read_layer(cache: jax.Array, layer: int | jax.Array, rows: jax.Array, dtype,
               window: int | None = None) -> jax.Array:
    """cache [layers, rows, max_len, H, d] (KVCache storage), rows [B] -> [B, window, H, d] of
    `dtype`: each row's first `window` positions (all max_len when None). Attention cost follows
    the window, so a caller that knows every position in the batch is below it reads and
    scores only that much."""
    out = cache[layer, rows, :window]
    dtype = jnp.dtype(dtype)
    return out if out.dtype == dtype else jax.lax.bitcast_convert_type(out, dtype)
