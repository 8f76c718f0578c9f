"""The "dense" backend: one matmul over all slots, then a per-token select (plain JAX).

Where no Pallas kernel runs (CPU), the per-token gather of the reference reads T copies of the
adapter weights ([T, D, R] materialized). Computing every slot at once reads each adapter once
and turns the work into two ordinary matmuls, which XLA's CPU backend runs well:
  shrink: [T, D_in] @ a [S, D_in, R] with the slots side by side ([D_in, S*R], a transposed
          copy of the stack) -> [T, S, R], keep slot[t]'s row;
  expand: one-hot-masked h [T, S*R] @ b reshaped [S*R, D_out] (a free reshape).
It spends S times the minimal FLOPs, which pays off while S*R stays small next to D (decode); see
scripts/bench_kernels.py --forms against the tiled backend, whose cost does not grow with S.
With fewer tokens than slots the per-token gather reads fewer adapter bytes than all S slots,
so that case uses it instead.
Reference: pallas_kernels.reference.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference


def one_hot(slot: jax.Array, num_slots: int) -> jax.Array:
    """slot [T] -> [T, S] float32; slot -1 matches no column, so its row is all zero."""
    return (slot[:, None] == jnp.arange(num_slots, dtype=slot.dtype)).astype(jnp.float32)


def shrink(x: jax.Array, a: jax.Array, slot: jax.Array) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 -> h [T, R] float32."""
    tokens, num_slots = x.shape[0], a.shape[0]
    if tokens < num_slots:
        return reference.shrink(x, a, slot)
    picked = jnp.take_along_axis(_every_slot(x, a), jnp.maximum(slot, 0)[:, None, None],
                                 axis=1)[:, 0]
    return jnp.where(slot[:, None] >= 0, picked, 0.0)


def expand_sliced(
    y: jax.Array, h: jax.Array, bs: Sequence[jax.Array], slot: jax.Array
) -> jax.Array:
    """y [T, sum W_i], h [T, n*R], bs n arrays [S, R, W_i] -> y + per-slice h_i @ b_i[slot]."""
    rank = bs[0].shape[1]
    if h.shape[0] < bs[0].shape[0]:  # fewer tokens than slots: gather each token's B
        deltas = [jnp.einsum("tr,trw->tw", h[:, i * rank:(i + 1) * rank].astype(jnp.float32),
                             jnp.take(b, jnp.maximum(slot, 0), axis=0),
                             preferred_element_type=jnp.float32) for i, b in enumerate(bs)]
        return add_deltas(y, deltas, slot)
    masked = one_hot(slot, bs[0].shape[0])[:, :, None] * h.astype(jnp.float32)[:, None, :]
    return add_deltas(y, _expand_masked(masked, bs), slot)


def apply_sliced(y: jax.Array, x: jax.Array, a: jax.Array, bs: Sequence[jax.Array],
                 slot: jax.Array) -> jax.Array:
    """shrink then expand_sliced without picking each token's rank-R row in between.

    The expand multiplies a one-hot-masked [T, S, n*R] anyway, so the shrink's every-slot
    output is masked in place: two matmuls and elementwise work per slice, no per-token gather.
    """
    num_slots = a.shape[0]
    if x.shape[0] < num_slots:
        return expand_sliced(y, shrink(x, a, slot), bs, slot)
    masked = _every_slot(x, a) * one_hot(slot, num_slots)[:, :, None]
    return add_deltas(y, _expand_masked(masked, bs), slot)


def _every_slot(x: jax.Array, a: jax.Array) -> jax.Array:
    """x [T, D_in], a [S, D_in, R] -> [T, S, R] float32: every slot's shrink, one matmul."""
    num_slots, d_in, rank = a.shape
    side_by_side = jnp.transpose(a, (1, 0, 2)).reshape(d_in, num_slots * rank)
    every = jnp.dot(x, side_by_side, preferred_element_type=jnp.float32)
    return every.reshape(x.shape[0], num_slots, rank)


def _expand_masked(masked: jax.Array, bs: Sequence[jax.Array]) -> list[jax.Array]:
    """masked [T, S, n*R] (zero outside each token's slot), bs n arrays [S, R, W_i] -> the n
    deltas [T, W_i] float32: masked slice i [T, S*R] @ b_i viewed as [S*R, W_i] (free)."""
    tokens, num_slots, _ = masked.shape
    rank = bs[0].shape[1]
    # In b's dtype: a mixed-dtype dot would convert all of b to float32 on every call.
    return [jnp.dot(masked[:, :, i * rank:(i + 1) * rank].reshape(tokens, num_slots * rank)
                    .astype(b.dtype), b.reshape(num_slots * rank, b.shape[-1]),
                    preferred_element_type=jnp.float32)
            for i, b in enumerate(bs)]  # the fused projections' slices (q|k|v): a handful


def add_deltas(y: jax.Array, deltas: list[jax.Array], slot: jax.Array) -> jax.Array:
    """y [T, sum W_i] + the slices' deltas [T, W_i], in y's dtype; slot -1 rows are y exactly.

    Slice by slice, then side by side: XLA fuses each add into what the model does with its
    slice next (the split of q|k|v or gate|up undoes the concatenation), where adding one
    concatenated delta to y materializes both.
    """
    starts = np.cumsum([0] + [d.shape[-1] for d in deltas])
    valid = slot[:, None] >= 0
    outs = [jnp.where(valid, (y[:, lo:hi].astype(jnp.float32) + d).astype(y.dtype), y[:, lo:hi])
            for lo, hi, d in zip(starts[:-1], starts[1:], deltas, strict=True)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def slot_outer(u: jax.Array, v: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
    """u [T, R], v [T, Q] -> [S, R, Q] float32: per slot, the sum of outer(u[t], v[t]).

    The expand gradient db = slot_outer(h, dy). The one-hot mask goes on the narrow side (the
    rank), so the one matmul is [S*R, T] @ [T, Q] and nothing of size T*S*Q is ever built;
    slot -1 tokens contribute exactly zero.
    """
    masked = one_hot(slot, num_slots)[:, :, None] * u.astype(jnp.float32)[:, None, :]
    return jnp.einsum("tsp,tq->spq", masked, v, preferred_element_type=jnp.float32)


def slot_outer_rank_masked(u: jax.Array, v: jax.Array, slot: jax.Array,
                           num_slots: int) -> jax.Array:
    """u [T, P], v [T, R] -> [S, P, R] float32: per slot, the sum of outer(u[t], v[t]).

    The shrink gradient da = slot_outer_rank_masked(x, dh): one [P, T] @ [T, S*R] matmul, the
    one-hot mask on the narrow side (the rank v), as in slot_outer.
    """
    masked = one_hot(slot, num_slots)[:, :, None] * v.astype(jnp.float32)[:, None, :]
    return jnp.einsum("tp,tsr->spr", u, masked, preferred_element_type=jnp.float32)
