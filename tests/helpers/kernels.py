"""Inputs and float64 answers for the kernel tests; no JAX model, no msgspec.

LORA_JAX_TEST_BACKEND picks which Pallas backend the kernel tests run: "pallas_interpret"
(default, any platform) or "pallas" (a GPU, see scripts/gpu_check.sh).
"""

import os
import zlib

import jax.numpy as jnp
import numpy as np

PALLAS_BACKEND = os.environ.get("LORA_JAX_TEST_BACKEND", "pallas_interpret")
# Relative to the largest expected magnitude: float32 accumulation error, bfloat16 rounding.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def seeded_rng(request) -> np.random.Generator:
    """Fresh random data for every test, reproducible from the test's id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def random_slots(rng: np.random.Generator, tokens: int, num_slots: int, kind: str) -> np.ndarray:
    """kind "none": all -1; "one": all on one slot; "mix": random, with -1 and S-1 present."""
    if kind == "none":
        return np.full(tokens, -1, np.int32)
    if kind == "one":
        return np.full(tokens, rng.integers(num_slots), np.int32)
    slot = rng.integers(-1, num_slots, tokens).astype(np.int32)
    slot[0], slot[-1] = -1, num_slots - 1
    return slot


def normal(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> jnp.ndarray:
    """Standard normal values (never zero) rounded to dtype."""
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def stacks(rng, num_slots: int, d_in: int, rank: int, widths, dtype):
    """a [S, D_in, n*R] and n stacks b [S, R, w], scaled so the LoRA term is of order one."""
    a = normal(rng, (num_slots, d_in, rank * len(widths)), dtype, d_in**-0.5)
    bs = tuple(normal(rng, (num_slots, rank, w), dtype, rank**-0.5) for w in widths)
    return a, bs


def f64(value) -> np.ndarray:
    return np.asarray(jnp.asarray(value, jnp.float32), np.float64)


def shrink64(x, a, slot) -> np.ndarray:
    """float64 h[t] = x[t] @ a[slot[t]], zero where slot is -1 (a [S, D_in, R])."""
    slot = np.asarray(slot)
    h = np.einsum("td,tdr->tr", f64(x), f64(a)[np.maximum(slot, 0)])
    return np.where(slot[:, None] >= 0, h, 0.0)


def expand64(y, h, bs, slot) -> np.ndarray:
    """float64 y + per-slice h_i @ b_i[slot[t]], y itself where slot is -1."""
    slot = np.asarray(slot)
    rank = bs[0].shape[1]
    deltas = [
        np.einsum("tr,tro->to", f64(h)[:, i * rank : (i + 1) * rank], f64(b)[np.maximum(slot, 0)])
        for i, b in enumerate(bs)
    ]
    out = f64(y) + np.concatenate(deltas, axis=-1)
    return np.where(slot[:, None] >= 0, out, f64(y))


def assert_close(actual, expected: np.ndarray, dtype) -> None:
    actual = f64(actual)
    assert np.isfinite(actual).all(), "kernel left unwritten (NaN-poisoned) or non-finite elements"
    tol = TOLERANCE[dtype]
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def assert_bitwise_equal(actual, expected) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.tobytes() == expected.tobytes()
