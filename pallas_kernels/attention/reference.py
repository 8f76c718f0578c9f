"""Plain-JAX ragged paged attention: the definition the Pallas kernel must equal.

Each token finds its sequence, gathers that sequence's pages into one contiguous K and V, and
attends to the cache positions up to its own (causal within the chunk, the whole prefix before),
or with a sliding window only to the last `sliding_window` of them.
Simple over fast: it materializes [T, MB * block_size, KV, d] copies of the cache.
"""

import jax
import jax.numpy as jnp


def token_positions(query_start, kv_lens, num_seqs, tokens: int):
    """Per token: its sequence, its cache position and whether it is a real (not padding) token.

    Token t of sequence i (query_start[i] <= t < query_start[i + 1]) sits at position
    kv_lens[i] - q_len_i + (t - query_start[i]).
    """
    t = jnp.arange(tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(query_start, t, side="right").astype(jnp.int32) - 1
    seq = jnp.clip(seq, 0, kv_lens.shape[0] - 1)
    valid = (t < query_start[num_seqs[0]]) & (seq < num_seqs[0])
    q_len = query_start[seq + 1] - query_start[seq]
    position = kv_lens[seq] - q_len + (t - query_start[seq])
    return seq, position, valid


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None) -> jax.Array:
    """Shapes as pallas_kernels.attention.ragged_paged_attention; -> [T, H, d] in q's dtype."""
    tokens, heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pages.shape
    group = heads // kv_heads
    seq, position, valid = token_positions(query_start, kv_lens, num_seqs, tokens)
    pages = jnp.clip(block_tables[seq], 0, num_blocks - 1)  # [T, MB]; unused entries may be junk
    context = pages.shape[1] * block_size

    def one_token(q_t, pages_t, position_t):
        k = k_pages[pages_t].reshape(context, kv_heads, dim).astype(jnp.float32)
        v = v_pages[pages_t].reshape(context, kv_heads, dim).astype(jnp.float32)
        q_t = q_t.reshape(kv_heads, group, dim).astype(jnp.float32)
        scores = jnp.einsum("kgd,ckd->kgc", q_t, k, precision="highest") * sm_scale
        if soft_cap is not None:
            scores = jnp.tanh(scores / soft_cap) * soft_cap
        visible = jnp.arange(context) <= position_t
        if sliding_window is not None:
            visible &= jnp.arange(context) > position_t - sliding_window
        scores = jnp.where(visible, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("kgc,ckd->kgd", probs, v, precision="highest").reshape(heads, dim)

    out = jax.vmap(one_token)(q, pages, position)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)
