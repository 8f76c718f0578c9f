"""The plain-XLA paged attention (models.ragged) against a dense softmax on random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.ragged import KV_CHUNK, AttnSpec, _attend_pages

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
