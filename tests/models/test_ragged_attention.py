"""The plain-XLA paged attention (models.ragged) against a dense softmax on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.ragged import (
    ENTRY_BLOCK,
    KV_CHUNK,
    TILE,
    AttnSpec,
    RaggedMeta,
    _attend_pages,
    ragged_attention,
)

LAYERS, KV, GROUP, DIM, BLOCK = 2, 2, 2, 8, 16


def _dense(q, k, v, tables, qpos, layer):
    """softmax(q.k) v over each row's positions <= its query's, gathered densely (float64)."""
    n, nq = qpos.shape
    out = np.zeros(q.shape)
    for r in range(n):
        keys = np.concatenate([k[layer, b] for b in tables[r]])  # [positions, KV, d]
        values = np.concatenate([v[layer, b] for b in tables[r]])
        for i in range(nq):
            if qpos[r, i] < 0:
                continue
            ks, vs = keys[:qpos[r, i] + 1], values[:qpos[r, i] + 1]
            s = np.einsum("kgd,skd->kgs", q[r, i], ks) * DIM ** -0.5
            p = np.exp(s - s.max(-1, keepdims=True))
            out[r, i] = np.einsum("kgs,skd->kgd", p / p.sum(-1, keepdims=True), vs)
    return out


@pytest.mark.parametrize("furthest", [5, KV_CHUNK // 2 - 1, KV_CHUNK // 2, KV_CHUNK - 1,
                                      KV_CHUNK + 10, 2 * KV_CHUNK - 1])
@pytest.mark.parametrize("half_tail", [False, True])
def test_paged_attention_equals_a_dense_softmax_whatever_the_last_chunk_holds(furthest,
                                                                              half_tail):
    # The furthest query decides the chunks read; with half_tail a last chunk it needs half
    # of or less is read as a half chunk. Other rows stop earlier, some queries are unused.
    rng = np.random.default_rng(furthest)
    rows, queries, pages = 3, 4, 2 * KV_CHUNK // BLOCK
    blocks = rows * pages + 1
    k, v = (rng.standard_normal((LAYERS, blocks, BLOCK, KV, DIM)) for _ in range(2))
    tables = rng.permutation(blocks)[:rows * pages].reshape(rows, pages)
    q = rng.standard_normal((rows, queries, KV, GROUP, DIM))
    qpos = np.array([[furthest, furthest - 1, -1, 0],
                     [3, 2, 1, -1],
                     [min(furthest, 7), -1, -1, -1]])
    got = _attend_pages(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                        jnp.asarray(v, jnp.float32), 1, jnp.asarray(tables, jnp.int32),
                        jnp.asarray(qpos, jnp.int32), jnp.float32, AttnSpec(DIM ** -0.5),
                        half_tail=half_tail)
    want = _dense(q, k, v, tables, qpos, 1)
    used = qpos >= 0
    np.testing.assert_allclose(np.asarray(got)[used], want[used], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_ragged_batch_of_many_decode_rows_and_tiles_equals_a_dense_softmax(dtype):
    # More decode rows and prefill tiles than one block of entries (ENTRY_BLOCK), with
    # padding entries after them: every used entry is attended, whichever block it falls in.
    # In bfloat16 the pool holds uint16 bits (as KVCache stores it) and the output is
    # scattered as bits.
    rng = np.random.default_rng(0)
    decodes, prompts = ENTRY_BLOCK + 5, [(40, 300), (0, 150), (9, 70)]  # (cached, new)
    rows = decodes + len(prompts)
    pages = 24  # per table: a multiple of the chunk's pages, past every context here
    contexts = [int(c) for c in rng.integers(1, 320, decodes)] + [c + n for c, n in prompts]
    blocks = rows * pages + 1
    tables = rng.permutation(blocks)[:rows * pages].reshape(rows, pages)
    k, v = (rng.standard_normal((LAYERS, blocks, BLOCK, KV, DIM)) for _ in range(2))
    starts = [c - 1 for c in contexts[:decodes]] + [c for c, _ in prompts]
    lengths = [1] * decodes + [n for _, n in prompts]
    t = sum(lengths) + 11  # padding tokens at the end
    r, nt = rows + 10, sum(-(-n // TILE) for _, n in prompts) + 7
    positions, token_req = np.full(t, -1, np.int32), np.full(t, r, np.int32)
    dec_token, dec_req = np.full(r, t, np.int32), np.zeros(r, np.int32)
    tile_start, tile_len, tile_req = (np.zeros(nt, np.int32) for _ in range(3))
    cursor = tile = 0
    for i, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        positions[cursor:cursor + n] = np.arange(start, start + n)
        token_req[cursor:cursor + n] = i
        if n == 1:
            dec_token[i], dec_req[i] = cursor, i
        for offset in range(0, n, TILE) if n > 1 else ():
            tile_start[tile], tile_len[tile] = cursor + offset, min(TILE, n - offset)
            tile_req[tile] = i
            tile += 1
        cursor += n
    assert tile > ENTRY_BLOCK
    full_tables = np.zeros((r, pages), np.int32)
    full_tables[:rows] = tables
    meta = RaggedMeta(*(jnp.asarray(a) for a in (
        positions, np.zeros(t, np.int32), token_req, full_tables, dec_token, dec_req,
        tile_start, tile_len, tile_req, np.zeros(r + 1, np.int32), np.zeros(r, np.int32),
        np.array([rows], np.int32))))
    q = rng.standard_normal((t, KV * GROUP, DIM))
    if dtype == "bfloat16":  # the reference sees the rounded inputs
        q, k, v = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (q, k, v))
    pool = [jnp.asarray(a, dtype) for a in (k, v)]
    if dtype == "bfloat16":
        pool = [jax.lax.bitcast_convert_type(a, jnp.uint16) for a in pool]
    attend = jax.jit(lambda q, k, v: ragged_attention(q, k, v, 1, meta, dtype, backend="xla"))
    args = (jnp.asarray(q, dtype), *pool)
    got = np.asarray(attend(*args), np.float64)
    if dtype == "bfloat16":  # the output moves as bits: no float32 copy of it is made
        assert f"f32[{t + 1},{KV * GROUP},{DIM}]" not in attend.lower(*args).compile().as_text()
    used = positions >= 0
    want = np.zeros_like(q)
    for i in range(t):
        if used[i]:
            row = token_req[i]
            want[i] = _dense(q[i].reshape(1, 1, KV, GROUP, DIM), k, v, tables[row:row + 1],
                             positions[i:i + 1][None], 1).reshape(KV * GROUP, DIM)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(got[used], want[used], **tol)
    assert not got[~used].any()
