import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.worker.sampler import (
    EVERYTHING,
    History,
    SamplingArrays,
    SamplingMode,
    _filter,
    _largest_threshold,
    _sortable,
    adjust,
    first_argmax,
    mode_of,
    penalize,
    sample,
)

V = 64
_sample = jax.jit(sample, static_argnums=2)


def _params(n, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=None, counter=0,
            presence=0.0, frequency=0.0, repetition=1.0):
    full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (n,))  # noqa: E731
    seeds = jnp.arange(n, dtype=jnp.uint32) if seed is None else full(seed, jnp.uint32)
    return SamplingArrays(full(temperature, jnp.float32), full(top_k, jnp.int32),
                          full(top_p, jnp.float32), full(min_p, jnp.float32), seeds,
                          full(counter, jnp.int32), full(presence, jnp.float32),
                          full(frequency, jnp.float32), full(repetition, jnp.float32))


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


def test_a_seeded_row_draws_the_same_when_another_row_asks_for_a_filter():
    logits = _logits(2, seed=10)
    plain = _params(2, seed=42, counter=3)
    filtered = plain._replace(top_p=jnp.array([1.0, 0.5], jnp.float32))  # row 1 only
    draw = jax.jit(sample, static_argnums=(2, 5))
    tokens = [int(draw(logits, p, 0, None, None, mode_of(_host(p))).tokens[0])
              for p in (plain, filtered)]
    assert tokens[0] == tokens[1]


def test_first_argmax_is_argmax_and_takes_the_first_of_ties():
    logits = np.array(_logits(64, seed=8))
    logits[3, [5, 9, 40]] = logits[3].max() + 1.0  # a three-way tie for the top
    np.testing.assert_array_equal(first_argmax(jnp.asarray(logits)), np.argmax(logits, -1))
    assert int(first_argmax(jnp.asarray(logits))[3]) == 5
    logits[7, 11] = np.nan  # a broken row still names a token inside the vocabulary
    np.testing.assert_array_equal(first_argmax(jnp.asarray(logits)), np.argmax(logits, -1))


def _host(params: SamplingArrays) -> SamplingArrays:
    return SamplingArrays(*(None if x is None else np.asarray(x) for x in params))


def _adjusted(params: SamplingArrays, bias: dict, held: dict, width: int = 6) -> SamplingArrays:
    """params with logit biases ({row: {id: bias}}) and held ids ({row: [ids]}, held this
    step), padded as input_batch pads them: (0, 0.0) and -1."""
    n = params.temperature.shape[0]
    bias_ids, values = np.zeros((n, width), np.int32), np.zeros((n, width), np.float32)
    held_ids, hold = np.full((n, width), -1, np.int32), np.zeros(n, bool)
    for r, pairs in bias.items():
        bias_ids[r, :len(pairs)], values[r, :len(pairs)] = list(pairs), list(pairs.values())
    for r, ids in held.items():
        held_ids[r, :len(ids)], hold[r] = ids, True
    return params._replace(hold=jnp.asarray(hold), bias_ids=jnp.asarray(bias_ids),
                           bias=jnp.asarray(values), held_ids=jnp.asarray(held_ids))


def test_adjust_adds_each_rows_bias_and_holds_its_ids_off_pads_change_nothing():
    logits = _logits(4, seed=12)
    bias, held = {0: {3: 100.0, 9: -100.0, 0: 0.5}, 2: {V - 1: 7.25}}, {1: [2, 5], 2: [V - 1]}
    got = np.asarray(adjust(logits, _adjusted(_params(4), bias, held)))
    want = np.array(logits)
    for r, pairs in bias.items():
        for t, b in pairs.items():
            want[r, t] += np.float32(b)
    for r, ids in held.items():
        want[r, ids] = -np.inf  # a held id stays out whatever its bias
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.array_equal(got[3], np.asarray(logits)[3])  # a row with pads only: untouched


def test_a_biased_or_held_row_samples_accordingly_with_raw_logprobs():
    logits = _logits(3, seed=13)
    top = np.asarray(jnp.argmax(logits, -1))
    target = (int(top[0]) + 1) % V
    params = _adjusted(_params(3, temperature=0.0), {0: {target: 100.0}, 2: {int(top[2]): 100.0}},
                       {1: [int(top[1])], 2: [int(top[2])]})
    out = jax.jit(sample, static_argnums=(2, 5))(logits, params, 0, None, None,
                                                 mode_of(_host(params)))
    second = np.argsort(-np.asarray(logits[1]))[1]
    assert out.tokens[0] == target and out.tokens[1] == second
    assert out.tokens[2] != top[2]  # held beats a +100 bias
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(out.logprob, raw[np.arange(3), np.asarray(out.tokens)],
                               rtol=1e-6)


def test_the_mode_of_a_batch_names_only_the_work_some_row_needs():
    none = SamplingMode(False, False, False, False, False, False)
    assert mode_of(_host(_params(4, temperature=0.0))) == none
    # A filter on a greedy row changes nothing, so it asks for no filtering.
    assert mode_of(_host(_params(4, temperature=0.0, top_k=3))) == none
    assert mode_of(_host(_params(4, temperature=0.7))) == none._replace(random=True)
    assert mode_of(_host(_params(4, temperature=0.7, top_p=0.9, min_p=0.1))) == none._replace(
        random=True, top_p=True, min_p=True)
    assert mode_of(_host(_params(4, temperature=0.7, top_k=5))) == none._replace(
        random=True, top_k=True)
    assert mode_of(_host(_params(4, temperature=0.0, repetition=1.2))) == none._replace(
        penalties=True)
    biased = _adjusted(_params(4, temperature=0.0), {1: {5: 2.0}}, {})
    assert mode_of(_host(biased)) == none._replace(adjust=True)
    held = _adjusted(_params(4, temperature=0.0), {}, {2: [7]})
    assert mode_of(_host(held)) == none._replace(adjust=True)
    assert mode_of(_host(_adjusted(_params(4, temperature=0.0), {}, {}))) == none


def _vllm_kept(scaled, top_k, top_p, min_p):
    """vLLM's filters row by row in numpy (sort-based): min-p on the full distribution, top-k,
    then top-p on the renormalized rest -> bool mask of kept tokens."""
    keep = np.ones(scaled.shape, bool)
    for r, x in enumerate(np.asarray(scaled, np.float64)):
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        alive = probs >= min_p[r] * probs.max()
        order = np.argsort(-x)
        if top_k[r] > 0:
            alive[order[top_k[r]:]] = False
        q = np.where(alive, probs, 0.0)
        q /= q.sum()
        ascending = order[::-1]
        dropped = np.cumsum(q[ascending]) <= 1 - top_p[r]
        dropped[-1] = False  # the top token always stays
        alive[ascending[dropped]] = False
        keep[r] = alive
    return keep


def test_filters_keep_exactly_the_tokens_vllm_keeps():
    rng = np.random.default_rng(3)
    rows, vocab = 24, 300
    scaled = rng.standard_normal((rows, vocab)).astype(np.float32) * 3.0
    top_k = rng.choice([-1, 1, 7, 40, 299], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.05], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.01, 0.2], rows).astype(np.float32)
    params = SamplingArrays(jnp.ones(rows), jnp.asarray(top_k), jnp.asarray(top_p),
                            jnp.asarray(min_p), *[jnp.zeros(rows)] * 5)
    masked = jax.jit(_filter, static_argnums=2)(jnp.asarray(scaled), params, EVERYTHING)
    np.testing.assert_array_equal(np.isfinite(np.asarray(masked)),
                                  _vllm_kept(scaled, top_k, top_p, min_p))


def test_thresholds_are_exact_over_negative_and_infinite_logits():
    x = jnp.asarray([[-jnp.inf, -3.5, -1e-30, 0.0, 2.25, 2.25, 7.0, -jnp.inf]], jnp.float32)
    keys = _sortable(x)
    for k, want in ((1, 7.0), (2, 2.25), (4, 0.0), (5, -1e-30), (6, -3.5)):
        t = _largest_threshold(keys, lambda t, k=k: jnp.sum(keys >= t[:, None], -1) >= k)
        value = jax.lax.bitcast_convert_type(jnp.where(t < 0, t ^ 0x7FFFFFFF, t), jnp.float32)
        assert np.asarray(value)[0] == np.float32(want)


def test_the_draw_follows_the_distribution_across_blocks_and_never_picks_a_masked_token():
    vocab = 300  # three blocks of the two-level inverse CDF, the last one partial
    logits = np.full(vocab, -jnp.inf, np.float32)
    logits[[5, 130, 131, 299]] = np.log([0.1, 0.2, 0.3, 0.4])
    rows = 6000
    params = _params(rows)._replace(seed=jnp.arange(rows, dtype=jnp.uint32))
    out = _sample(jnp.tile(jnp.asarray(logits), (rows, 1)), params, 0)
    tokens = np.asarray(out.tokens)
    assert set(tokens.tolist()) <= {5, 130, 131, 299}
    freq = np.array([(tokens == t).mean() for t in (5, 130, 131, 299)])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.02)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=0.8),
                                    dict(temperature=0.8, top_k=5, top_p=0.7),
                                    dict(temperature=0.0, presence=1.0, repetition=1.3)])
def test_a_batch_sampled_in_its_own_mode_equals_the_full_path(kwargs):
    logits = _logits(16, seed=9)
    params = _params(16, **kwargs)
    counts = np.zeros((16, V), np.int32)
    counts[:, :8] = 2
    history = History(jnp.asarray(counts), jnp.zeros((16, V), bool))
    rows = jnp.arange(16, dtype=jnp.int32)
    full = _sample(logits, params, 2, history, rows)
    own = jax.jit(sample, static_argnums=(2, 5))(logits, params, 2, history, rows,
                                                 mode_of(_host(params)))
    for a, b in zip(full, own, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _vllm_penalties(logits, counts, in_prompt, presence, frequency, repetition):
    """vLLM's order and rules, row by row in numpy (float64)."""
    out = np.array(logits, np.float64)
    for b in range(out.shape[0]):
        seen = (counts[b] > 0) | in_prompt[b]
        row = out[b]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[b], row[seen] * repetition[b])
        row -= frequency[b] * counts[b] + presence[b] * (counts[b] > 0)
    return out


def test_penalties_follow_vllm_on_the_rows_of_the_batch():
    rng = np.random.default_rng(0)
    rows, batch = 6, 4
    counts = rng.integers(0, 3, (rows, V)) * (rng.random((rows, V)) < 0.3)
    in_prompt = rng.random((rows, V)) < 0.2
    logits = np.asarray(_logits(batch, seed=3))
    which = np.array([4, 0, 2, 5])
    presence, frequency = [0.5, 0.0, -1.0, 2.0], [0.3, 0.0, 0.7, -0.2]
    repetition = [1.3, 1.0, 0.8, 2.0]
    got = penalize(jnp.asarray(logits), _params(batch, presence=presence, frequency=frequency,
                                                 repetition=repetition),
                   History(jnp.asarray(counts, jnp.int32), jnp.asarray(in_prompt)),
                   jnp.asarray(which, jnp.int32))
    want = _vllm_penalties(logits, counts[which], in_prompt[which], presence, frequency,
                           repetition)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - logits).max() > 0.5  # the penalties did something


def test_sample_draws_after_penalties_but_reports_raw_logprobs():
    logits = _logits(2, seed=5)
    top = np.asarray(jnp.argmax(logits, axis=-1))
    counts = np.zeros((2, V), np.int32)
    counts[0, top[0]] = 1  # row 0 generated its favourite before; row 1 did not
    history = History(jnp.asarray(counts), jnp.zeros((2, V), bool))
    out = _sample(logits, _params(2, temperature=0.0, presence=2.0, frequency=2.0), 0, history,
                  jnp.arange(2, dtype=jnp.int32))
    assert out.tokens[0] != top[0] and out.tokens[1] == top[1]
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(out.logprob, raw[[0, 1], np.asarray(out.tokens)], rtol=1e-6)
