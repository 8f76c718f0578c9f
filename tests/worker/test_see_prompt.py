"""The penalty history of a step with prompts: reused rows forget, prompt tokens are marked."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.worker.runner import _see_prompt
from lora_jax.worker.sampler import History


@pytest.mark.parametrize("seed", range(4))
def test_fresh_rows_forget_their_previous_sequence_and_prompt_tokens_are_marked(seed):
    rng = np.random.default_rng(seed)
    rows, vocab, entries, tokens = 12, 17, 8, 30
    counts = rng.integers(1, 5, (rows, vocab)).astype(np.int32)
    marks = rng.random((rows, vocab)) < 0.5
    row = rng.permutation(rows)[:entries].astype(np.int32)
    fresh = rng.random(entries) < 0.5
    prompt = fresh | (rng.random(entries) < 0.3)
    token_req = np.sort(rng.integers(0, entries + 1, tokens)).astype(np.int32)  # R = padding
    positions = np.where(token_req < entries, rng.integers(0, 50, tokens), -1).astype(np.int32)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    req = SimpleNamespace(row=jnp.asarray(row), fresh=jnp.asarray(fresh),
                          prompt=jnp.asarray(prompt))
    meta = SimpleNamespace(token_req=jnp.asarray(token_req), positions=jnp.asarray(positions))
    got = jax.jit(lambda h, t: _see_prompt(h, t, meta, req))(
        History(jnp.asarray(counts), jnp.asarray(marks)), jnp.asarray(ids))
    want_counts, want_marks = counts.copy(), marks.copy()
    want_counts[row[fresh]] = 0
    want_marks[row[fresh]] = False
    for t in range(tokens):
        if token_req[t] < entries and prompt[token_req[t]]:
            want_marks[row[token_req[t]], ids[t]] = True
    np.testing.assert_array_equal(np.asarray(got.output_counts), want_counts)
    np.testing.assert_array_equal(np.asarray(got.in_prompt), want_marks)
