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


@pytest.mark.parametrize("fill", [False, True])
def test_take_rows_has_the_gradient_of_jnp_take(fill):
    # Training runs the tiled backend through take_rows: its gradient must not stop at the
    # bitcast. Repeated indices add up; rows past the end (fill) pass nothing back.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((6, 4)), jnp.bfloat16)
    index = jnp.asarray([5, 0, 2, 2, 8] if fill else [5, 0, 2, 2], jnp.int32)
    weights = jnp.asarray(rng.standard_normal((index.shape[0], 4)), jnp.float32)
    mode = dict(mode="fill", fill_value=0) if fill else dict(mode="clip")

    def loss(take):
        return lambda x: jnp.sum(take(x).astype(jnp.float32) * weights)

    got = jax.grad(loss(lambda x: take_rows(x, index, fill)))(x)
    want = jax.grad(loss(lambda x: jnp.take(x, index, axis=0, **mode)))(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.abs(np.asarray(got, np.float32)).sum() > 0
