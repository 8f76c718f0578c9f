"""Every backend of pallas_kernels against a float64 numpy computation.

The Pallas kernels run in interpret mode here (LORA_JAX_TEST_BACKEND=pallas runs them on a GPU).
Shrink outputs start NaN-filled (aliased poison buffer) and expand outputs alias y, so an element
a kernel never writes fails the comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kernels import (
    PALLAS_BACKEND,
    assert_bitwise_equal,
    assert_close,
    expand64,
    f64,
    normal,
    random_slots,
    shrink64,
    stacks,
)

import pallas_kernels as pk
from pallas_kernels import pallas_backend

# (T, D_in, D_out, S, R, slots): odd sizes, S in {1, 4, 16}, R in {1, 8, 16, 64}, all slot kinds,
# fewer tokens than slots.
CASES = [
    (13, 96, 80, 1, 8, "mix"),
    (13, 96, 80, 1, 8, "none"),
    (9, 32, 48, 4, 1, "mix"),
    (24, 64, 32, 16, 16, "mix"),
    (7, 64, 32, 16, 16, "one"),
    (6, 48, 64, 4, 64, "mix"),
]
# float32 on every case; bfloat16 (looser, and slower to interpret) on the odd-shaped ones.
DTYPE_CASES = [(jnp.float32, case) for case in CASES] + [
    (jnp.bfloat16, case) for case in (CASES[0], CASES[2], CASES[3], CASES[5])
]
IMPLS = ["gather", "grouped", "tiled", "dense", "reference"]
DTYPES = [jnp.float32, jnp.bfloat16]


def _case_id(dtype_case):
    dtype, case = dtype_case
    return "{}-T{}-D{}x{}-S{}-R{}-{}".format(dtype.__name__, *case)


def _run_shrink(impl, x, a, slot):
    if impl in pallas_backend.PATTERNS:
        plan = pallas_backend.Plan(
            interpret=PALLAS_BACKEND == "pallas_interpret", pattern=impl, poison=True
        )
        return jax.jit(pallas_backend.forward_shrink, static_argnums=3)(x, a, slot, plan)
    return _jitted(pk.lora_shrink, impl)(x, a, slot)


def _backend_kwargs(impl):
    if impl in pallas_backend.PATTERNS:
        return {"backend": PALLAS_BACKEND, "pattern": impl}
    return {"backend": impl}


def _jitted(fn, impl):
    """One compiled program per call (eager dispatch would compile every small op on its own)."""
    return jax.jit(functools.partial(fn, **_backend_kwargs(impl)))


@pytest.mark.parametrize("dtype_case", DTYPE_CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_shrink_matches_float64(impl, dtype_case, rng):
    dtype, case = dtype_case
    tokens, d_in, _, num_slots, rank, kind = case
    x = normal(rng, (tokens, d_in), dtype)
    a, _ = stacks(rng, num_slots, d_in, rank, [1], dtype)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, kind))
    h = _run_shrink(impl, x, a, slot)
    assert h.shape == (tokens, rank) and h.dtype == jnp.float32
    assert_close(h, shrink64(x, a, slot), dtype)
    assert np.all(np.asarray(h)[np.asarray(slot) < 0] == 0.0)


@pytest.mark.parametrize("dtype_case", DTYPE_CASES, ids=_case_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_expand_matches_float64_and_slot_minus_one_keeps_y_exactly(impl, dtype_case, rng):
    dtype, case = dtype_case
    tokens, _, d_out, num_slots, rank, kind = case
    y = normal(rng, (tokens, d_out), dtype)
    h = normal(rng, (tokens, rank), jnp.float32)
    _, (b,) = stacks(rng, num_slots, 1, rank, [d_out], dtype)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, kind))
    out = _jitted(pk.lora_expand, impl)(y, h, b, slot)
    assert out.shape == y.shape and out.dtype == dtype
    assert_close(out, expand64(y, h, (b,), slot), dtype)
    none = np.asarray(slot) < 0
    assert_bitwise_equal(np.asarray(out)[none], np.asarray(y)[none])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("widths", [(64, 32, 32), (48, 48)], ids=["qkv", "gate_up"])
def test_apply_sliced_matches_float64(impl, widths, dtype, rng):
    tokens, d_in, num_slots, rank = 11, 64, 4, 8
    x = normal(rng, (tokens, d_in), dtype)
    y = normal(rng, (tokens, sum(widths)), dtype)
    a, bs = stacks(rng, num_slots, d_in, rank, widths, dtype)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, "mix"))
    out = _jitted(pk.lora_apply_sliced, impl)(y, x, a, bs, slot)
    expected = expand64(y, shrink64(x, a, slot), bs, slot)
    assert_close(out, expected, dtype)
    none = np.asarray(slot) < 0
    assert_bitwise_equal(np.asarray(out)[none], np.asarray(y)[none])


@pytest.mark.parametrize("impl", IMPLS)
def test_apply_in_float16(impl, rng):
    tokens, d_in, d_out, num_slots, rank = 16, 32, 32, 4, 16
    x = normal(rng, (tokens, d_in), jnp.float16)
    y = normal(rng, (tokens, d_out), jnp.float16)
    a, (b,) = stacks(rng, num_slots, d_in, rank, [d_out], jnp.float16)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, "mix"))
    out = _jitted(pk.lora_apply, impl)(y, x, a, b, slot)
    assert out.dtype == jnp.float16
    assert_close(out, expand64(y, shrink64(x, a, slot), (b,), slot), jnp.float16)


@pytest.mark.parametrize("impl", ["gather", "grouped", "tiled", "dense"])
@pytest.mark.parametrize("widths", [(32,), (32, 16, 16)], ids=["single", "qkv"])
def test_gradients_match_jax_grad_of_reference(impl, widths, rng):
    tokens, d_in, num_slots, rank = 10, 32, 4, 8
    x = normal(rng, (tokens, d_in), jnp.float32)
    y = normal(rng, (tokens, sum(widths)), jnp.float32)
    a, bs = stacks(rng, num_slots, d_in, rank, widths, jnp.float32)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, "mix"))
    cotangent = normal(rng, y.shape, jnp.float32)

    def loss(kwargs, y, x, a, bs):
        out = pk.lora_apply_sliced(y, x, a, bs, slot, **dict(kwargs))
        return jnp.sum(out * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    got = grad(tuple(_backend_kwargs(impl).items()), y, x, a, bs)
    want = grad((("backend", "reference"),), y, x, a, bs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, f64(w), jnp.float32)


def test_block_sizes_override_gives_the_same_result(rng):
    tokens, d_in, d_out, num_slots, rank = 40, 32, 32, 4, 16
    x = normal(rng, (tokens, d_in), jnp.float32)
    y = normal(rng, (tokens, d_out), jnp.float32)
    a, (b,) = stacks(rng, num_slots, d_in, rank, [d_out], jnp.float32)
    slot = jnp.asarray(random_slots(rng, tokens, num_slots, "one"))
    sizes = pk.BlockSizes(block_t=16, block_k=16, block_n=16)
    apply = functools.partial(pk.lora_apply, backend=PALLAS_BACKEND, pattern="grouped",
                              block_sizes=sizes)
    out = jax.jit(apply)(y, x, a, b, slot)
    assert_close(out, expand64(y, shrink64(x, a, slot), (b,), slot), jnp.float32)
