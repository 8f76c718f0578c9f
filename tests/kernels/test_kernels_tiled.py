"""The "tiled" backend (the CPU default) against a float64 numpy computation, with many slots:
steps with one, a few and many distinct adapters (every branch it can take), slot -1 tokens,
and adapters whose rank is below the stacks' max rank (zero-padded columns)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kernels import (
    assert_bitwise_equal,
    assert_close,
    expand64,
    normal,
    shrink64,
    stacks,
)

import pallas_kernels as pk
from pallas_kernels import tiled


def _slots(rng, tokens: int, num_slots: int, distinct: int) -> np.ndarray:
    """distinct adapters drawn from all S slots, a quarter of the tokens (at least one) on -1."""
    used = rng.choice(num_slots, size=distinct, replace=False)
    slot = used[rng.integers(0, distinct, tokens)].astype(np.int32)
    slot[:distinct] = used[:tokens]  # every drawn adapter appears
    slot[rng.random(tokens) < 0.25] = -1
    slot[-1] = -1
    return rng.permutation(slot)


def _low_rank(a, bs, num_slots: int, rank: int, rng):
    """Half the slots hold an adapter of a smaller rank: its columns past that rank are zero."""
    a, bs = np.array(a), [np.array(b) for b in bs]
    for s in rng.choice(num_slots, size=num_slots // 2, replace=False):
        r = int(rng.integers(1, rank))
        for i, b in enumerate(bs):
            a[s, :, i * rank + r:(i + 1) * rank] = 0
            b[s, r:, :] = 0
    return jnp.asarray(a), tuple(jnp.asarray(b) for b in bs)


# (T, S, distinct): the compact branch (1 adapter), tile branches (2 to T adapters), slots
# in the hundreds, fewer tokens than slots, one token.
CASES = [(8, 64, 1), (8, 256, 2), (8, 256, 3), (8, 256, 7), (40, 64, 5), (40, 64, 30),
         (64, 256, 48), (130, 8, 8), (300, 256, 17), (1, 256, 1)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-S{}-used{}".format(*c))
def test_tiled_apply_sliced_matches_float64_with_many_slots(case, dtype, rng):
    tokens, num_slots, distinct = case
    d_in, rank, widths = 48, 8, (32, 16, 16)
    x = normal(rng, (tokens, d_in), dtype)
    y = normal(rng, (tokens, sum(widths)), dtype)
    a, bs = _low_rank(*stacks(rng, num_slots, d_in, rank, widths, dtype), num_slots, rank, rng)
    slot = jnp.asarray(_slots(rng, tokens, num_slots, min(distinct, tokens)))

    def step(y, x, a, bs, slot):
        meta = pk.lora_meta(slot, num_slots, backend="tiled")  # once, read by every call
        out = pk.lora_apply_sliced(y, x, a, bs, slot, backend="tiled", meta=meta)
        h = pk.lora_shrink(x, a, slot, backend="tiled", meta=meta)
        parts = pk.lora_apply_split(y, x, a, bs, slot, backend="tiled", meta=meta)
        return out, h, pk.lora_expand(y[:, :widths[0]], h[:, :rank], bs[0], slot,
                                      backend="tiled", meta=meta), parts

    out, h, first, parts = jax.jit(step)(y, x, a, bs, slot)
    h64 = shrink64(x, a, slot)
    assert_close(h, h64, dtype)
    assert_close(out, expand64(y, h64, bs, slot), dtype)
    # The split form (the model's path): the same sums, slice by slice.
    assert [p.shape[1] for p in parts] == list(widths)
    joined = jnp.concatenate(parts, axis=1)
    assert_close(joined, expand64(y, h64, bs, slot), dtype)
    assert_bitwise_equal(np.asarray(joined)[np.asarray(slot) < 0],
                         np.asarray(y)[np.asarray(slot) < 0])
    assert_close(first, expand64(y[:, :widths[0]], h, bs[:1], slot), dtype)
    none = np.asarray(slot) < 0
    assert_bitwise_equal(np.asarray(out)[none], np.asarray(y)[none])


def test_a_step_runs_the_smallest_branch_that_holds_its_tokens(rng):
    tokens, num_slots = 64, 256
    ladder = tiled.tile_ladder(tokens, num_slots)
    meta = jax.jit(functools.partial(tiled.step_meta, num_slots=num_slots))
    one = meta(jnp.full(tokens, 200, jnp.int32))
    many = meta(jnp.asarray(np.arange(tokens) * 3 % num_slots, jnp.int32))
    assert int(one.branch) == 0  # one adapter: the compact branch over that adapter alone
    # Every token on its own adapter: the last tile branch, whose tile count fits them all.
    assert int(many.branch) == len(tiled.COMPACT_LADDER) + len(ladder) - 1
    assert ladder[-1] == tokens  # a tile per token at most, whatever the number of slots
    assert ladder[0] == -(-tokens // tiled.tile_rows(tokens))


def test_lora_meta_is_none_for_backends_that_need_none():
    slot = jnp.zeros(8, jnp.int32)
    assert pk.lora_meta(slot, 4, backend="dense") is None
    assert pk.lora_meta(slot, 4, backend="reference") is None
    with pytest.raises(ValueError, match="slot must be an integer array"):
        pk.lora_meta(slot.astype(jnp.float32), 4, backend="tiled")


@pytest.mark.parametrize("distinct", [1, 5])  # the compact branch, a tile branch
def test_a_site_no_adapter_uses_takes_the_skip_branch_and_adds_nothing(distinct, rng):
    tokens, num_slots, d_in, rank, widths = 40, 64, 48, 8, (32, 16, 16)
    x, y = normal(rng, (tokens, d_in), jnp.float32), normal(rng, (tokens, sum(widths)),
                                                            jnp.float32)
    a, bs = stacks(rng, num_slots, d_in, rank, widths, jnp.float32)
    slot = jnp.asarray(_slots(rng, tokens, num_slots, distinct))

    def step(used):
        meta = pk.lora_meta_for_site(pk.lora_meta(slot, num_slots, backend="tiled"), used)
        return pk.lora_apply_sliced(y, x, a, bs, slot, backend="tiled", meta=meta)

    def split(used):  # the model's form: the parts, rounded once to bfloat16
        meta = pk.lora_meta_for_site(pk.lora_meta(slot, num_slots, backend="tiled"), used)
        return jnp.concatenate(pk.lora_apply_split(y, x, a, bs, slot, backend="tiled",
                                                   meta=meta, dtype=jnp.bfloat16), axis=1)

    run = jax.jit(step)
    want = expand64(y, shrink64(x, a, slot), bs, slot)
    assert_close(run(jnp.bool_(True)), want, jnp.float32)
    assert_bitwise_equal(np.asarray(run(jnp.bool_(False))), np.asarray(y))
    assert_close(jax.jit(split)(jnp.bool_(True)), want, jnp.bfloat16)
    assert_bitwise_equal(np.asarray(jax.jit(split)(jnp.bool_(False))),
                         np.asarray(y.astype(jnp.bfloat16)))
    assert pk.lora_meta_for_site(None, jnp.bool_(False)) is None  # other backends: as it is


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_the_split_form_of_other_backends_is_their_sliced_result_cut(backend, rng):
    tokens, num_slots, d_in, rank, widths = 24, 8, 48, 8, (32, 16)
    x, y = normal(rng, (tokens, d_in), jnp.float32), normal(rng, (tokens, sum(widths)),
                                                            jnp.float32)
    a, bs = stacks(rng, num_slots, d_in, rank, widths, jnp.float32)
    slot = jnp.asarray(_slots(rng, tokens, num_slots, 3))
    whole = pk.lora_apply_sliced(y, x, a, bs, slot, backend=backend)
    parts = pk.lora_apply_split(y, x, a, bs, slot, backend=backend, dtype=jnp.bfloat16)
    assert [p.dtype for p in parts] == [jnp.bfloat16] * 2
    assert_bitwise_equal(np.asarray(jnp.concatenate(parts, axis=1)),
                         np.asarray(whole.astype(jnp.bfloat16)))
