"""Public entry points; `backend=` picks the implementation.

backend: "pallas" (GPU, Triton), "pallas_interpret" (any platform, tests), "reference" (plain JAX).
None picks "pallas" on GPU and "reference" elsewhere.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import reference

BACKENDS = ("pallas", "pallas_interpret", "reference")


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def _resolve(backend: str | None) -> str:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    return backend


def lora_shrink(x, a, slot, *, backend: str | None = None) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 (-1 = none) -> [T, R] float32."""
    _resolve(backend)
    return reference.shrink(x, a, slot)


def lora_expand(y, h, b, slot, *, backend: str | None = None) -> jax.Array:
    """y [T, D_out], h [T, R], b [S, R, D_out], slot [T] -> y + h @ b[slot], y's dtype."""
    _resolve(backend)
    return reference.expand(y, h, b, slot)


def lora_apply(y, x, a, b, slot, *, backend: str | None = None) -> jax.Array:
    """y [T, D_out], x [T, D_in], a [S, D_in, R], b [S, R, D_out] -> y + (x @ a[slot]) @ b[slot]."""
    h = lora_shrink(x, a, slot, backend=backend)
    return lora_expand(y, h, b, slot, backend=backend)


def lora_apply_sliced(
    y, x, a, bs: Sequence[jax.Array], slot, *, backend: str | None = None
) -> jax.Array:
    """Fused projection: y [T, sum(w_i)], x [T, D_in], a [S, D_in, n*R], bs n arrays [S, R, w_i].

    Slice i of the output gets (x @ a[slot][:, i*R:(i+1)*R]) @ bs[i][slot].
    """
    n = len(bs)
    rank = a.shape[-1] // n
    h = lora_shrink(x, a, slot, backend=backend)
    outs, start = [], 0
    for i, b in enumerate(bs):
        width = b.shape[-1]
        outs.append(
            lora_expand(y[:, start : start + width], h[:, i * rank : (i + 1) * rank], b, slot,
                        backend=backend)
        )
        start += width
    return jnp.concatenate(outs, axis=-1)
