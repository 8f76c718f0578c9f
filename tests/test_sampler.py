import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.sampler import SamplingArrays, sample

V = 64
_sample = jax.jit(sample, static_argnums=2)


def _params(n, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, counter=0):
    full = lambda v, dt: jnp.full((n,), v, dt)  # noqa: E731
    seeds = jnp.arange(n, dtype=jnp.uint32) if seed is None else full(seed, jnp.uint32)
    return SamplingArrays(full(temperature, jnp.float32), full(top_k, jnp.int32),
                          full(top_p, jnp.float32), full(min_p, jnp.float32), seeds,
                          full(counter, jnp.int32))


def _logits(n, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, V)) * 2.0


def test_temperature_zero_is_argmax_and_logprob_is_the_raw_log_softmax():
    logits = _logits(8)
    out = _sample(logits, _params(8, temperature=0.0), 3)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(logits, -1))
    expected = jax.nn.log_softmax(logits)[jnp.arange(8), out.tokens]
    np.testing.assert_allclose(out.logprob, expected, rtol=1e-6)
    np.testing.assert_array_equal(out.top_ids[:, 0], out.tokens)


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-4), dict(min_p=1.0)])
def test_filters_that_keep_only_the_top_token_sample_it(filters):
    logits = _logits(16, seed=1)
    out = _sample(logits, _params(16, temperature=1.5, **filters), 0)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(logits, -1))


def test_top_k_samples_only_among_the_k_best():
    logits = jnp.tile(_logits(1, seed=2), (512, 1))
    out = _sample(logits, _params(512, temperature=5.0, top_k=3), 0)
    top3 = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    assert set(np.asarray(out.tokens).tolist()) == top3


def test_samples_follow_the_softmax_distribution():
    logits = jnp.tile(jnp.array([[2.0, 1.0, 0.0] + [-30.0] * (V - 3)]), (4000, 1))
    out = _sample(logits, _params(4000), 0)
    freq = np.bincount(np.asarray(out.tokens), minlength=3)[:3] / 4000
    np.testing.assert_allclose(freq, jax.nn.softmax(jnp.array([2.0, 1.0, 0.0])), atol=0.03)


def test_a_seeded_row_samples_the_same_whatever_else_is_in_the_batch():
    row = _logits(1, seed=3)
    alone = _sample(row, _params(1, seed=42, counter=5), 0).tokens[0]
    batch_logits = jnp.concatenate([_logits(5, seed=4), row])
    params = _params(6, seed=7, counter=5)._replace(
        seed=jnp.array([1, 2, 3, 4, 5, 42], jnp.uint32))
    assert _sample(batch_logits, params, 0).tokens[5] == alone
    other_step = _sample(row, _params(1, seed=42, counter=6), 0).tokens[0]
    draws = {int(_sample(row, _params(1, seed=s), 0).tokens[0]) for s in range(20)}
    assert len(draws) > 1 and other_step in range(V)
