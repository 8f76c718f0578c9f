"""16-bit floats moved as their bits, for the plain-XLA paths.

XLA:CPU gathers and scatters a bfloat16 or float16 array by converting the operand to float32,
moving the values element by element (a select for out-of-range indices) and converting back.
The same array viewed as uint16 moves in place, and a bitcast costs nothing. A bitcast carries no
gradient, so take_rows defines its own (training runs through it).
"""

import functools

import jax
import jax.numpy as jnp


def as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bits; any other array unchanged."""
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_bits(x: jax.Array, dtype) -> jax.Array:
    """The inverse of as_bits for values of `dtype`."""
    dtype = jnp.dtype(dtype)
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_rows(x: jax.Array, index: jax.Array, fill: bool = False) -> jax.Array:
    """x[index] along axis 0. fill: indices past the end give zero rows (else they must be in
    range; they are clamped). Differentiable in x, as jnp.take is."""
    mode = dict(mode="fill", fill_value=0) if fill else dict(mode="clip")
    return from_bits(jnp.take(as_bits(x), index, axis=0, **mode), x.dtype)


def _take_rows_fwd(x, index, fill):
    return take_rows(x, index, fill), (x, index)


def _take_rows_bwd(fill, residuals, grad):
    x, index = residuals
    if not fill:
        index = jnp.clip(index, 0, x.shape[0] - 1)
    # Rows past the end (fill) took no value from x, so their gradient goes nowhere.
    return jnp.zeros_like(x).at[index].add(grad, mode="drop"), None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)
