"""The Pallas backends: picks the access pattern, groups tokens, and carries the gradients.

Forward: "gather" (decode: one program per token, each reads its own adapter) or "grouped"
(prefill: tokens sorted into blocks of one adapter, each block a tensor-core matmul).
Backward (jax.custom_vjp): the activation gradients run through the same kernels on transposed
adapter stacks (dx = expand with a as [S, R, D_in], dh = shrink with b as [W, S, R]); the adapter
gradients are one dense matmul over all slots with a one-hot mask on the rank side
(dense.slot_outer, dense.slot_outer_rank_masked), a shape XLA's matmul handles well, and slot -1
contributes exactly zero.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import blocks, dense, grouping
from pallas_kernels.blocks import BlockSizes
from pallas_kernels.gather_expand import gather_expand
from pallas_kernels.gather_shrink import gather_shrink
from pallas_kernels.grouped_expand import grouped_expand
from pallas_kernels.grouped_shrink import grouped_shrink

PATTERNS = ("gather", "grouped")
# Below this many tokens a batch is decode-like: adapters get too few rows to fill tensor-core
# blocks, and sorting costs more than it saves. A first guess; bench_kernels.py measures both.
GROUPED_MIN_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the Pallas backends run: interpret mode, access pattern (None = by token count),
    tiles, and poison (start shrink outputs NaN-filled, for tests)."""

    interpret: bool = False
    pattern: str | None = None
    blocks: BlockSizes = BlockSizes()
    poison: bool = False

    def __post_init__(self):
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"pattern={self.pattern!r} is not one of {PATTERNS}")

    def grouped(self, tokens: int) -> bool:
        if self.pattern is None:
            return tokens >= GROUPED_MIN_TOKENS
        return self.pattern == "grouped"

    def groups(self, slot: jax.Array, num_slots: int) -> tuple[int, grouping.Groups]:
        block_t = blocks.group_block_t(slot.shape[0], num_slots, self.blocks.block_t)
        return block_t, grouping.group_by_slot(slot, num_slots, block_t)


def _groups(plan: Plan, slot: jax.Array, num_slots: int, groups: grouping.Groups | None
            ) -> tuple[int, grouping.Groups]:
    """(block_t, groups): the step's own groups when given (built once per step), else built."""
    if groups is None:
        return plan.groups(slot, num_slots)
    return groups.rows.shape[0] // groups.block_slot.shape[0], groups


def forward_shrink(x: jax.Array, a: jax.Array, slot: jax.Array, plan: Plan,
                   groups: grouping.Groups | None = None) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] -> h [T, R] float32; groups: see Plan.groups."""
    kw = dict(block_k=plan.blocks.block_k, interpret=plan.interpret, poison=plan.poison)
    if not plan.grouped(x.shape[0]):
        return gather_shrink(x, a, slot, **kw)
    block_t, groups = _groups(plan, slot, a.shape[0], groups)
    h = grouped_shrink(grouping.gather_rows(x, groups), a, groups.block_slot, block_t=block_t, **kw)
    return grouping.scatter_rows(h, groups)


def forward_expand(
    y: jax.Array, h: jax.Array, terms: Sequence[tuple[jax.Array, int]], slot: jax.Array, plan: Plan,
    groups: grouping.Groups | None = None,
) -> jax.Array:
    """y [T, D], h [T, n*R], terms n pairs (b_i [S, R, W_i], col_i), slot [T] -> y's dtype.

    Columns col_i:col_i+W_i of y get h[:, iR:(i+1)R] @ b_i[slot]; each kernel call aliases the
    previous output, so the slices of a fused projection are written in place.
    """
    kw = dict(block_n=plan.blocks.block_n, interpret=plan.interpret)
    grouped = plan.grouped(y.shape[0])
    if grouped:
        block_t, groups = _groups(plan, slot, terms[0][0].shape[0], groups)
        y, h = grouping.gather_rows(y, groups), grouping.gather_rows(h, groups)
    for i, (b, col) in enumerate(terms):  # a fused projection's slices: a static handful
        if grouped:
            y = grouped_expand(y, h, b, groups.block_slot, block_t=block_t, col=col, rank_index=i,
                               **kw)
        else:
            y = gather_expand(y, h, b, slot, col=col, rank_index=i, **kw)
    return grouping.scatter_rows(y, groups) if grouped else y


def _columns(bs: Sequence[jax.Array]) -> list[tuple[jax.Array, int]]:
    cols, start = [], 0
    for b in bs:
        cols.append((b, start))
        start += b.shape[-1]
    return cols


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def shrink(x: jax.Array, a: jax.Array, slot: jax.Array, groups, plan: Plan) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] -> h [T, R] float32, differentiable in x and a;
    groups: the step's grouping (api.lora_meta) or None."""
    return forward_shrink(x, a, slot, plan, groups)


def _shrink_fwd(x, a, slot, groups, plan):
    return forward_shrink(x, a, slot, plan, groups), (x, a, slot, groups)


def _shrink_bwd(plan, residuals, dh):
    x, a, slot, groups = residuals
    dh = dh.astype(jnp.float32)
    rank = a.shape[-1]
    # dx[t] = a[slot] @ dh[t]: expands with the stack transposed to [S, R, D_in], one per
    # power-of-two chunk of the rank (a fused q|k|v stack has 3R columns), all into dx.
    chunk = blocks.pow2_divisor(rank, rank)
    a_t = jnp.transpose(a, (0, 2, 1))
    terms = [(a_t[:, c : c + chunk, :], 0) for c in range(0, rank, chunk)]
    dx = forward_expand(jnp.zeros(x.shape, jnp.float32), dh, terms, slot, plan, groups)
    da = dense.slot_outer_rank_masked(x, dh, slot, a.shape[0])
    return dx.astype(x.dtype), da.astype(a.dtype), None, None


shrink.defvjp(_shrink_fwd, _shrink_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def expand(y: jax.Array, h: jax.Array, bs: tuple, slot: jax.Array, groups, plan: Plan
           ) -> jax.Array:
    """y [T, sum W_i], h [T, n*R], bs n arrays [S, R, W_i], slot [T] -> y + h_i @ b_i[slot]."""
    return forward_expand(y, h, _columns(bs), slot, plan, groups)


def _expand_fwd(y, h, bs, slot, groups, plan):
    return forward_expand(y, h, _columns(bs), slot, plan, groups), (h, bs, slot, groups)


def _expand_bwd(plan, residuals, dout):
    h, bs, slot, groups = residuals
    rank = h.shape[1] // len(bs)
    dh, dbs = [], []
    for i, (b, col) in enumerate(_columns(bs)):
        dout_i = dout[:, col : col + b.shape[-1]]
        h_i = h[:, i * rank : (i + 1) * rank]
        # dh[t] = b[slot] @ dout[t]: a shrink with the stack transposed to [S, W, R].
        dh.append(forward_shrink(dout_i, jnp.transpose(b, (0, 2, 1)), slot, plan, groups))
        dbs.append(dense.slot_outer(h_i, dout_i, slot, b.shape[0]).astype(b.dtype))
    dh = dh[0] if len(dh) == 1 else jnp.concatenate(dh, axis=-1)
    return dout, dh.astype(h.dtype), tuple(dbs), None, None


expand.defvjp(_expand_fwd, _expand_bwd)
