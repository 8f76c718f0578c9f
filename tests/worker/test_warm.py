"""Warm runs at start-up: every branch a real step can take has run before the first request."""

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.worker.input_batch import RowInput, ShapeLadder
from lora_jax.worker.warm import warm_batches
from pallas_kernels.tiled import step_meta

BLOCK, MAX_LEN = 16, 128


def _branch(rows: list[RowInput], tokens: int, num_slots: int) -> int:
    """The tiled backend's branch for this batch padded to `tokens` (what its step runs)."""
    slot = np.full(tokens, -1, np.int32)
    at = 0
    for r in rows:
        slot[at:at + len(r.tokens)] = r.slot
        at += len(r.tokens)
    return int(step_meta(jnp.asarray(slot), num_slots).branch)


def _random_batch(rng, ladder: ShapeLadder, num_slots: int) -> list[RowInput]:
    """Decodes and prompt chunks on random slots (some on the base model) that fit the top
    bucket."""
    top = ladder.shapes()[-1]
    rows, tokens = [], 0
    for _ in range(rng.integers(1, top.requests + 1)):
        size = 1 if rng.random() < 0.6 else int(rng.integers(2, MAX_LEN // 2))
        row = RowInput(tokens=[1] * size, start=0, row=0, block_table=[0],
                       slot=int(rng.integers(-1, num_slots)))
        if tokens + size > top.tokens:
            break
        rows.append(row)
        tokens += size
        try:
            ladder.fit(rows)
        except ValueError:  # too many prefill tiles
            rows.pop()
            break
    return rows


@pytest.mark.parametrize("num_slots,max_seqs", [(8, 32), (64, 256), (3, 4)])
def test_random_batches_take_only_branches_the_warm_runs_took(num_slots, max_seqs):
    ladder = ShapeLadder(256, max_seqs, 4)
    warmed = {(s.tokens, _branch(b.rows, s.tokens, num_slots))
              for s in ladder.shapes() for b in warm_batches(s, num_slots, BLOCK, MAX_LEN)
              if b.sites}
    rng = np.random.default_rng(num_slots)
    taken = set()
    for _ in range(400):
        rows = _random_batch(rng, ladder, num_slots)
        if rows:
            shape = ladder.fit(rows)
            taken.add((shape.tokens, _branch(rows, shape.tokens, num_slots)))
    assert taken <= warmed, f"branches no warm run took: {sorted(taken - warmed)}"
    assert len(taken) > len(ladder.shapes())  # the random batches reach several branches


def test_every_bucket_warms_the_skip_branch_the_general_sampler_and_both_attention_layouts():
    ladder = ShapeLadder(128, 16, 4)
    for shape in ladder.shapes():
        batches = warm_batches(shape, 4, BLOCK, MAX_LEN)
        rows = [r for b in batches for r in b.rows]
        assert any(not b.sites for b in batches)
        assert any(b.num_logprobs for b in batches)
        assert any(r.sampling.temperature > 0 and r.fresh and r.prompt for r in rows)
        assert any(len(r.tokens) == 1 for r in rows) and any(len(r.tokens) > 1 for r in rows)
        for b in batches:  # each batch fits the bucket it warms, within max_len, keeping nothing
            assert ladder.fit(b.rows).tokens <= shape.tokens
            assert all(r.start + len(r.tokens) <= MAX_LEN and not r.keeps for r in b.rows)
