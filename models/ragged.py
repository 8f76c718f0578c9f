"""One ragged batch over the paged KV cache: the scheduled tokens of every request, flattened.

The step sees T tokens (a power-of-two bucket) and R request entries. Each token carries its
position (-1 = padding), its request and its flat place in the pool (block * block_size +
offset). Attention reads each request's pages through its block table, in two static layouts
built on the host, so that no request pays for another's length:

- decode rows: requests with a single new token (decodes), one query each, [R] entries;
- query tiles: the tokens of multi-token chunks (prefills) in tiles of TILE tokens, each tile
  inside one request, so a tile's queries share one read of that request's pages.

Both run over blocks of ENTRY_BLOCK entries, as many blocks as the batch uses, and walk the
pages in chunks of KV_CHUNK positions with an online softmax (float32), for as many chunks as
the furthest query of that block needs: the cost follows the entries and the context in use,
neither is a compiled shape, and a layout the batch does not use reads nothing. On
GPU the same metadata feeds the Pallas ragged paged-attention kernel.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import ragged_paged_attention
from pallas_kernels.bits import as_bits, from_bits

TILE = 16  # query tokens per prefill tile
KV_CHUNK = 128  # cache positions per step of the online softmax
ENTRY_BLOCK = 32  # decode rows or query tiles attended per loop step


class RaggedMeta(NamedTuple):
    """The device arrays of a ragged batch (shapes: T tokens, R requests, NT tiles, MB pages)."""

    positions: jax.Array  # [T] int32, -1 = padding
    slot_mapping: jax.Array  # [T] int32 block * block_size + offset; past the pool = dropped
    token_req: jax.Array  # [T] int32 request of each token (R for padding)
    tables: jax.Array  # [R, MB] int32 block tables, MB a multiple of the chunk's pages
    dec_token: jax.Array  # [R] int32 token of each decode row (T = unused row)
    dec_req: jax.Array  # [R] int32 request of each decode row
    tile_start: jax.Array  # [NT] int32 first token of each tile
    tile_len: jax.Array  # [NT] int32 queries in each tile (0 = unused)
    tile_req: jax.Array  # [NT] int32 request of each tile
    query_start: jax.Array  # [R + 1] int32 first token of each request (the kernel's form)
    kv_lens: jax.Array  # [R] int32 cached tokens of each request after this step
    num_seqs: jax.Array  # [1] int32 requests in use


def chunk_pages(block_size: int) -> int:
    """Pages read per online-softmax chunk."""
    return max(1, KV_CHUNK // block_size)


def write_tokens(cache: jax.Array, layer: int, slot_mapping: jax.Array,
                 new: jax.Array, dtype) -> jax.Array:
    """cache [layers, blocks, block_size, KV, d] (KVCache storage of `dtype`), new [T, KV, d]
    -> new written at its slot; slots past the pool (padding) are dropped."""
    block_size = cache.shape[2]
    new = new.astype(dtype)
    if cache.dtype != new.dtype:
        new = jax.lax.bitcast_convert_type(new, cache.dtype)
    return cache.at[layer, slot_mapping // block_size, slot_mapping % block_size].set(
        new, mode="drop")


class AttnSpec(NamedTuple):
    """Static per-layer attention numerics: q.k scale, logit soft-cap, sliding window."""

    scale: float
    softcap: float | None = None
    window: int | None = None  # a query at q sees keys at q - window < k <= q


def _page_reader(tables, first_page, n: int, kv_heads: int, dim: int, layer: int, dtype):
    """read(cache, page, pages) -> the [N, pages * block_size, KV, d] positions of each row's
    pages page .. page + pages - 1 (counted from its first_page [N], or from 0 when None)."""
    def read(cache, page, pages: int):
        if first_page is None:
            ids = jax.lax.dynamic_slice_in_dim(tables, page, pages, axis=1)
        else:  # each row starts at its own first page inside its window
            col = first_page[:, None] + page + jnp.arange(pages)[None, :]
            ids = jnp.take_along_axis(tables, jnp.minimum(col, tables.shape[1] - 1), axis=1)
        out = cache[layer, ids].reshape(n, pages * cache.shape[2], kv_heads, dim)
        return out if out.dtype == dtype else jax.lax.bitcast_convert_type(out, dtype)
    return read


def _attend_pages(q, k_cache, v_cache, layer: int, tables, qpos, dtype, spec: AttnSpec,
                  half_tail: bool = False):
    """q [N, Q, KV, G, d]; tables [N, MB]; qpos [N, Q] (-1 = none) -> [N, Q, KV, G, d].

    Every query of row n attends to row n's cache positions <= its own position (and within
    spec.window of it: a row then starts at the first chunk its window reaches).

    half_tail (no window): a last chunk that the furthest query needs only half of is read as
    a half chunk, so a prompt of up to KV_CHUNK / 2 tokens (or a context just past a whole
    chunk) reads and scores half the keys; every chunk before it stays whole, so long
    contexts keep the loop's fewer, wider steps. It compiles a second step, so only the
    prefill tiles (whose queries all pay for the chunk's width) use it."""
    n, nq, kv_heads, group, dim = q.shape
    block_size = k_cache.shape[2]
    pages = chunk_pages(block_size)
    width = pages * block_size
    dtype = jnp.dtype(dtype)
    floor = jnp.finfo(jnp.float32).min
    q = q * jnp.asarray(spec.scale, q.dtype)
    last = jnp.max(qpos, axis=1)  # [N]
    first_page = None
    if spec.window is None:
        num_chunks = (jnp.max(qpos) + width) // width  # enough chunks for the furthest query
    else:
        lowest = jnp.min(jnp.where(qpos >= 0, qpos, jnp.iinfo(jnp.int32).max), axis=1)
        first = jnp.maximum(lowest - spec.window + 1, 0) // width
        first_page = first * pages
        num_chunks = jnp.max(jnp.where(last >= 0, (last + width) // width - first, 0))
    read = _page_reader(tables, first_page, n, kv_heads, dim, layer, dtype)

    def attend(page, count: int, carry):  # the online-softmax step over `count` pages
        m, total, acc = carry
        keys, values = read(k_cache, page, count), read(v_cache, page, count)
        s = jnp.einsum("nqkgd,nskd->nkgqs", q, keys, preferred_element_type=jnp.float32)
        if spec.softcap is not None:
            s = jnp.tanh(s / spec.softcap) * spec.softcap
        start = page if first_page is None else (first_page + page)[:, None, None]
        kpos = start * block_size + jnp.arange(count * block_size)
        visible = kpos <= qpos[:, :, None]  # [N, Q, S]
        if spec.window is not None:
            visible &= kpos > qpos[:, :, None] - spec.window
        s = jnp.where(visible[:, None, None], s, floor)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        total = total * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("nkgqs,nskd->nkgqd", p.astype(values.dtype), values,
                        preferred_element_type=jnp.float32)
        return m_new, total, acc * alpha[..., None] + pv

    carry = (jnp.full((n, kv_heads, group, nq), floor, jnp.float32),
             jnp.zeros((n, kv_heads, group, nq), jnp.float32),
             jnp.zeros((n, kv_heads, group, nq, dim), jnp.float32))
    furthest = jnp.max(qpos) if half_tail and spec.window is None else None
    _, total, acc = _walk(attend, carry, num_chunks, pages, block_size, furthest)
    out = acc / jnp.maximum(total, 1e-30)[..., None]
    return jnp.moveaxis(out, 3, 1)  # [N, Q, KV, G, d]


def _walk(attend, carry, num_chunks, pages: int, block_size: int, furthest=None):
    """attend(page, count, carry) over num_chunks chunks of `pages` pages; with furthest (the
    furthest query's position), a last chunk it needs half of or less runs as a half chunk."""
    half = pages // 2
    if furthest is None or not half:
        return jax.lax.fori_loop(0, num_chunks, lambda c, x: attend(c * pages, pages, x), carry)
    # positions the furthest query needs in the last chunk (1..width; <= 0 when unused)
    tail = furthest + 1 - (num_chunks - 1) * pages * block_size
    short = (num_chunks > 0) & (tail <= half * block_size)
    carry = jax.lax.fori_loop(0, num_chunks - short.astype(num_chunks.dtype),
                              lambda c, x: attend(c * pages, pages, x), carry)
    return jax.lax.cond(short, lambda x: attend((num_chunks - 1) * pages, half, x),
                        lambda x: x, carry)


def ragged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int,
                     meta: RaggedMeta, dtype, backend: str | None = None,
                     spec: AttnSpec | None = None) -> jax.Array:
    """q [T, H, d] of the batch's tokens; the caches hold this step's keys and values already
    -> [T, H, d] in q's dtype (padding tokens: zeros). spec: the layer's scale, soft-cap and
    window (None: head_dim^-0.5, neither cap nor window).

    backend: None picks the Pallas kernel on GPU and the plain-XLA layouts above elsewhere;
    "xla" forces those; any other value is passed to pallas_kernels.ragged_paged_attention."""
    if backend is None:
        backend = "pallas" if jax.default_backend() == "gpu" else "xla"
    if spec is None:
        spec = AttnSpec(q.shape[-1] ** -0.5)
    if backend != "xla":
        pages = [c[layer] if c.dtype == jnp.dtype(dtype) else
                 jax.lax.bitcast_convert_type(c[layer], jnp.dtype(dtype))
                 for c in (k_cache, v_cache)]
        return ragged_paged_attention(q, *pages, meta.kv_lens, meta.tables, meta.query_start,
                                      meta.num_seqs, backend=backend, **_kernel_args(q, spec))
    t, heads, dim = q.shape
    kv_heads = k_cache.shape[3]
    qg = q.reshape(t, kv_heads, heads // kv_heads, dim)
    # Row t takes the writes of unused entries; a 16-bit output is scattered as its bits.
    out = as_bits(jnp.zeros((t + 1, heads, dim), q.dtype))

    def decode_rows(out, start, size: int):
        token = jax.lax.dynamic_slice_in_dim(meta.dec_token, start, size)
        used = token < t
        safe = jnp.minimum(token, t - 1)
        qpos = jnp.where(used, meta.positions[safe], -1)
        tables = meta.tables[jax.lax.dynamic_slice_in_dim(meta.dec_req, start, size)]
        rows = _attend_pages(qg[safe][:, None], k_cache, v_cache, layer, tables, qpos[:, None],
                             dtype, spec)
        return out.at[token].set(as_bits(rows[:, 0].reshape(-1, heads, dim).astype(q.dtype)))

    def tiles(out, start, size: int):
        offsets = jnp.arange(TILE)
        length = jax.lax.dynamic_slice_in_dim(meta.tile_len, start, size)
        used = offsets[None, :] < length[:, None]  # [size, TILE]
        first = jax.lax.dynamic_slice_in_dim(meta.tile_start, start, size)
        index = jnp.where(used, first[:, None] + offsets[None, :], t)
        safe = jnp.minimum(index, t - 1)
        qpos = jnp.where(used, meta.positions[safe], -1)
        tables = meta.tables[jax.lax.dynamic_slice_in_dim(meta.tile_req, start, size)]
        rows = _attend_pages(qg[safe], k_cache, v_cache, layer, tables, qpos, dtype, spec,
                             half_tail=True)
        return out.at[index].set(as_bits(rows.reshape(*index.shape, heads, dim).astype(q.dtype)))

    # Each layout runs over blocks of its entries, as many as the batch uses (they come
    # first): padding entries read and score nothing, and each block reads only the chunks
    # its own furthest query needs. A layout the batch leaves unused is skipped whole.
    out = _by_blocks(decode_rows, out, jnp.sum(meta.dec_token < t), meta.dec_token.shape[0])
    out = _by_blocks(tiles, out, jnp.sum(meta.tile_len > 0), meta.tile_len.shape[0])
    return from_bits(out[:t], q.dtype)


def _by_blocks(step, out, used: jax.Array, n: int):
    """step(out, start, size) over the blocks of `size` entries covering the first `used` of
    n entries (none when used is 0). A last block past n starts earlier (it redoes a few
    entries, which write the same values), so every block has the one static size."""
    size = min(ENTRY_BLOCK, n)
    if size == n:  # one block: run it only when the layout is used
        return jax.lax.cond(used > 0, lambda o: step(o, 0, n), lambda o: o, out)
    count = (used + size - 1) // size
    return jax.lax.fori_loop(
        0, count, lambda b, o: step(o, jnp.minimum(b * size, n - size), size), out)


def _kernel_args(q: jax.Array, spec: AttnSpec) -> dict:
    """The kernel's keywords for what differs from its defaults (Llama passes none, so its
    call is the one it always was)."""
    args = {}
    if spec.scale != q.shape[-1] ** -0.5:
        args["sm_scale"] = spec.scale
    if spec.softcap is not None:
        args["soft_cap"] = spec.softcap
    if spec.window is not None:
        args["sliding_window"] = spec.window
    return args
