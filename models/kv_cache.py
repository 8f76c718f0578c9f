"""The KV cache: a pool of fixed-size blocks that sequences address through block tables.

Layout: k, v [layers, blocks, block_size, kv_heads, head_dim]. A token at position p of a
sequence whose block table is t lives at [:, t[p // block_size], p % block_size]. The row cache
(training, model tests) is the same pool with one max_len-sized block per sequence, addressed by
a row index. A block is reused without clearing: attention only reads entries at positions <=
the query's own, and the sequence has written all of those (or shares them from a prefix).

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

# Logical axes of the pool's k and v (see models.sharding): split over kv heads.
KV_AXES = ("layers", "blocks", "block", "kv_heads", "head_dim")


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


def _tables(rows: jax.Array) -> jax.Array:
    """Cache rows [B] are block tables [B, 1] whose one block holds the whole row."""
    return rows[:, None] if rows.ndim == 1 else rows


def write_layer(cache: jax.Array, layer: int | jax.Array, rows: jax.Array,
                positions: jax.Array, new: jax.Array, dtype) -> jax.Array:
    """cache [layers, blocks, block_size, H, d] (KVCache storage of `dtype`); rows [B] (one
    block per sequence: the row cache) or block tables [B, MB]; new [B, L, H, d] -> new as
    `dtype`, written at position p of sequence b: block rows[b, p // block_size], offset
    p % block_size.

    Padding (position -1) and positions past the table are dropped, not wrapped.
    """
    num_blocks, block_size = cache.shape[1], cache.shape[2]
    tables = _tables(rows)
    index = jnp.clip(positions // block_size, 0, tables.shape[1] - 1)
    block = jnp.take_along_axis(tables, index, axis=1)
    outside = (positions < 0) | (positions >= tables.shape[1] * block_size)
    block = jnp.where(outside, num_blocks, block)
    new = new.astype(dtype)
    if cache.dtype != new.dtype:
        new = jax.lax.bitcast_convert_type(new, cache.dtype)
    return cache.at[layer, block, positions % block_size].set(new, mode="drop")


def read_layer(cache: jax.Array, layer: int | jax.Array, rows: jax.Array, dtype,
               window: int | None = None) -> jax.Array:
    """cache [layers, blocks, block_size, H, d] (KVCache storage), rows [B] or block tables
    [B, MB] -> [B, window, H, d] of `dtype`: each sequence's first `window` positions (all
    of its table when None). Attention cost follows the window, so a caller that knows every
    position in the batch is below it reads and scores only that much."""
    if rows.ndim == 1:
        out = cache[layer, rows, :window]
    else:
        block_size = cache.shape[2]
        blocks = rows.shape[1] if window is None else -(-window // block_size)
        out = cache[layer, rows[:, :blocks]]  # only the blocks the window covers
        out = out.reshape(rows.shape[0], -1, *out.shape[3:])[:, :window]
    dtype = jnp.dtype(dtype)
    return out if out.dtype == dtype else jax.lax.bitcast_convert_type(out, dtype)


def init_paged_kv_cache(config: LlamaConfig, num_blocks: int, block_size: int,
                        dtype="float32") -> KVCache:
    """The paged pool: k, v [layers, num_blocks, block_size, kv_heads, head_dim]; sequences
    address it through block tables (see write_layer)."""
    return init_kv_cache(config, num_blocks, block_size, dtype)


def kv_bytes_per_token(config: LlamaConfig, dtype) -> int:
    """What one cached token costs: k and v over every layer."""
    return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            * jnp.dtype(dtype).itemsize)
