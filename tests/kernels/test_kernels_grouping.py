"""Token grouping of the prefill kernels, input validation, backend defaults, output poisoning."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kernels import (
    PALLAS_BACKEND,
    normal,
    random_slots,
    stacks,
)
from jax.experimental import pallas as pl

import pallas_kernels as pk
from pallas_kernels import blocks, grouping


@pytest.mark.parametrize(
    "tokens, num_slots, block_t", [(37, 4, 8), (5, 4, 16), (64, 16, 16), (13, 1, 16)]
)
def test_group_by_slot_puts_every_token_once_in_a_block_of_its_own_slot(
    tokens, num_slots, block_t, rng
):
    slot = random_slots(rng, tokens, num_slots, "mix")
    if tokens == num_slots + 1:  # worst case for padding: every run is one token long
        slot = np.arange(-1, num_slots, dtype=np.int32)
    groups = jax.jit(grouping.group_by_slot, static_argnums=(1, 2))(slot, num_slots, block_t)
    rows, position, block_slot = map(np.asarray, groups)
    n_blocks = grouping.num_blocks(tokens, num_slots, block_t)
    assert rows.shape == (n_blocks * block_t,) and block_slot.shape == (n_blocks,)
    np.testing.assert_array_equal(rows[position], np.arange(tokens))
    assert np.sum(rows < tokens) == tokens  # every other row is padding
    row_slot = np.repeat(block_slot, block_t)
    real = rows < tokens
    expected = np.where(slot < 0, -1, slot)[rows[real]]
    np.testing.assert_array_equal(row_slot[real], expected)


def test_gather_then_scatter_rows_gives_the_tokens_back_exactly(rng):
    tokens, num_slots = 29, 4
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, "mix"))
    x = normal(rng, (tokens, 24), jnp.bfloat16)

    @jax.jit
    def round_trip(x, slot):
        groups = grouping.group_by_slot(slot, num_slots, 8)
        grouped = grouping.gather_rows(x, groups)
        padding = groups.rows == tokens
        return grouping.scatter_rows(grouped, groups), jnp.where(padding[:, None], grouped, 0)

    back, padding_rows = round_trip(x, slot)
    assert np.asarray(back).tobytes() == np.asarray(x).tobytes()
    assert not np.any(np.asarray(padding_rows, np.float32))


def test_grouped_shapes_depend_only_on_tokens_slots_and_block():
    shapes = jax.eval_shape(
        functools.partial(grouping.group_by_slot, num_slots=8, block_t=64),
        jax.ShapeDtypeStruct((4096,), jnp.int32),
    )
    assert [s.shape for s in shapes] == [((64 + 8) * 64,), (4096,), (64 + 8,)]


def test_poisoned_launch_shows_elements_a_kernel_never_writes():
    def half_kernel(x_ref, out_ref):
        out_ref[:4] = x_ref[:4]

    out = blocks.launch(
        half_kernel, name="half_kernel", grid=(1,), operands=(jnp.ones(8, jnp.float32),),
        in_specs=(pl.BlockSpec((8,), lambda i: (0,)),), out_spec=pl.BlockSpec((8,), lambda i: (0,)),
        out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
        interpret=PALLAS_BACKEND == "pallas_interpret", poison=True,
    )
    np.testing.assert_array_equal(np.isnan(np.asarray(out)), [False] * 4 + [True] * 4)


def test_default_backend_is_tiled_off_gpu():
    expected = "pallas" if jax.default_backend() == "gpu" else "tiled"
    assert pk.default_backend() == expected


def _inputs(rng, d_in=32, d_out=16, rank=8, tokens=6, num_slots=2):
    x = normal(rng, (tokens, d_in), jnp.float32)
    y = normal(rng, (tokens, d_out), jnp.float32)
    a, (b,) = stacks(rng, num_slots, d_in, rank, [d_out], jnp.float32)
    return y, x, a, b, jnp.zeros(tokens, jnp.int32)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda y, x, a, b, s: (y, x[:, :-1], a, b, s), "D_in"),
        (lambda y, x, a, b, s: (y[:, :-1], x, a, b, s), "sum of the B widths"),
        (lambda y, x, a, b, s: (y, x.astype(jnp.int32), a, b, s), "dtype"),
        (lambda y, x, a, b, s: (y, x, a, b, s.astype(jnp.float32)), "integer"),
        (lambda y, x, a, b, s: (y, x, a, b, s[:-1]), "rows"),
        (lambda y, x, a, b, s: (y, x, a, b[:1], s), "slots"),
        (lambda y, x, a, b, s: (y, x, a[0], b, s), "dimensions"),
    ],
    ids=["d_in", "width", "x_dtype", "slot_dtype", "slot_len", "slot_count", "a_ndim"],
)
def test_mismatched_inputs_are_rejected_with_a_clear_error(change, message, rng):
    with pytest.raises(ValueError, match=message):
        pk.lora_apply(*change(*_inputs(rng)), backend="reference")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "cuda"}, "backend"),
        ({"backend": "pallas_interpret", "pattern": "sorted"}, "pattern"),
        ({"backend": "pallas_interpret", "block_sizes": pk.BlockSizes(block_k=64)}, "divide"),
    ],
    ids=["backend", "pattern", "block_k"],
)
def test_unknown_options_are_rejected(kwargs, message, rng):
    with pytest.raises(ValueError, match=message):
        pk.lora_apply(*_inputs(rng), **kwargs)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        pk.BlockSizes(block_n=48)


def test_pallas_backends_reject_a_rank_that_is_not_a_power_of_two(rng):
    with pytest.raises(ValueError, match="power-of-two rank"):
        pk.lora_apply(*_inputs(rng, rank=12), backend="pallas_interpret")
