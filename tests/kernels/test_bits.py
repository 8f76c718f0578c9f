"""16-bit floats gathered as their bits (pallas_kernels.bits): the values of jnp.take, without
XLA:CPU's float32 round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.bits import take_rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fill", [False, True])
def test_take_rows_gives_the_rows_of_jnp_take(dtype, fill):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((7, 5, 3)), dtype)
    index = jnp.asarray([6, 0, 3, 3, 9, 1] if fill else [6, 0, 3, 3, 1], jnp.int32)
    got = jax.jit(lambda x, i: take_rows(x, i, fill=fill))(x, index)
    assert got.dtype == x.dtype
    want = np.asarray(x, np.float32)[np.minimum(np.asarray(index), 6)]
    if fill:  # past the end: zero rows
        want[np.asarray(index) > 6] = 0
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_a_bfloat16_gather_converts_nothing():
    x = jnp.ones((64, 128, 24), jnp.bfloat16)
    index = jnp.arange(96, dtype=jnp.int32) % 64
    for fill in (False, True):
        hlo = jax.jit(lambda x, i, f=fill: take_rows(x, i, fill=f)).lower(x, index).compile()
        assert "f32[" not in hlo.as_text()
