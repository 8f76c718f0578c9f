"""The KV cache: one row per running sequence, indexed by token position.

Layout: k, v [layers, rows, max_len, kv_heads, head_dim]. A token at position p of a sequence
in row r lives at [:, r, p]. A row is reused by a new sequence without clearing: attention only
reads entries at positions <= the query's own, and the new sequence has written all of those.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from models.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """k, v [layers, rows, max_len, kv_heads, head_dim] in the model's dtype."""

    k: jax.Array
    v: jax.Array

    @property
    def num_rows(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_kv_cache(config: LlamaConfig, num_rows: int, max_len: int, dtype="float32") -> KVCache:
    """Zeros of [layers, num_rows, max_len, kv_heads, head_dim] for k and for v."""
    for name, value in (("num_rows", num_rows), ("max_len", max_len)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shape = (config.num_hidden_layers, num_rows, max_len, config.num_key_value_heads,
             config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def write_layer(
    cache: jax.Array, layer: jax.Array, rows: jax.Array, positions: jax.Array, new: jax.Array
) -> jax.Array:
    """cache [layers, rows, max_len, H, d]; new [B, L, H, d] -> [layer, rows[b], positions[b, l]].

    Padding (position -1) and positions past max_len are dropped, not wrapped.
    """
    max_len = cache.shape[2]
    index = jnp.where(positions < 0, max_len, positions)
    return cache.at[layer, rows[:, None], index].set(new.astype(cache.dtype), mode="drop")


def read_layer(cache: jax.Array, layer: jax.Array, rows: jax.Array,
               window: int | None = None) -> jax.Array:
    """cache [layers, rows, max_len, H, d], rows [B] -> [B, window, H, d]: each row's first
    `window` positions (all max_len when None). Attention cost follows the window, so a caller
    that knows every position in the batch is below it reads and scores only that much."""
    return cache[layer, rows, :window]
