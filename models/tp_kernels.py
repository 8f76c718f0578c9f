"""The Pallas kernels of a tensor-parallel model, each run under shard_map on its device's shard.

GSPMD cannot split a Pallas call (an opaque custom call: it would gather every operand whole
onto each device and run the whole kernel there), so with the Pallas backends the split model
runs each kernel per device, on the layout of models.sharding:

- column-parallel q|k|v and gate|up: A is whole on every device, so each device shrinks the
  whole x itself (no communication); each expand writes that device's columns of its part
  with its columns of B.
- row-parallel o and down: each device shrinks its input columns with its rows of A; the
  [T, n*R] partial sums are summed over the devices (psum, small), then the expand with the
  whole B adds to the base output (already all-reduced by GSPMD).
- attention: each device attends with its query heads over its kv heads of the pool, with the
  layer's scale, soft-cap and sliding window (models.ragged.AttnSpec).

The step's LoRA metadata (pallas_kernels.lora_meta: tokens grouped by slot) is built once from
the whole slot vector and enters every kernel replicated.

The plain-JAX backends (tiled, dense, reference, xla) need none of this: GSPMD splits them.
"""

import jax
from jax.sharding import Mesh, PartitionSpec

from models.ragged import AttnSpec, RaggedMeta, ragged_attention
from pallas_kernels import default_backend, lora_expand, lora_shrink

TP = "tp"  # the mesh axis tensor parallelism splits over (models.sharding.TP)
P = PartitionSpec


def runs_pallas(backend: str | None, default: str) -> bool:
    """Whether `backend` (None: the platform's `default`) is a Pallas kernel."""
    return (backend or default).startswith("pallas")


def lora_runs_pallas(backend: str | None) -> bool:
    return runs_pallas(backend, default_backend())


def attention_runs_pallas(backend: str | None) -> bool:
    return runs_pallas(backend, "pallas" if jax.default_backend() == "gpu" else "xla")


def _map(mesh: Mesh, fn, in_specs, out_specs):
    # Pallas calls carry no varying-axes types, so shard_map's replication check is off; every
    # output here is replicated by construction (whole inputs, or a psum).
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def column_shrink(mesh: Mesh, x, a, slot, backend, meta=None) -> jax.Array:
    """x [T, D] and a [S, D, n*R] whole on every device -> [T, n*R] float32, whole.
    meta: the step's LoRA metadata (pallas_kernels.lora_meta of the whole slot), replicated."""
    def shrink(x, a, slot, meta):
        return lora_shrink(x, a, slot, backend=backend, meta=meta)

    return _map(mesh, shrink, (P(), P(), P(), P()), P())(x, a, slot, meta)


def column_expand(mesh: Mesh, y, h, b, slot, backend, meta=None) -> jax.Array:
    """y [T, W] split over columns, h [T, R] whole, b [S, R, W] split over W -> y + h @ b."""
    def expand(y, h, b, slot, meta):
        return lora_expand(y, h, b, slot, backend=backend, meta=meta)

    return _map(mesh, expand, (P(None, TP), P(), P(None, None, TP), P(), P()), P(None, TP))(
        y, h, b, slot, meta)


def row_apply(mesh: Mesh, y, x, a, b, slot, backend, meta=None) -> jax.Array:
    """y [T, D] whole, x [T, d_in] and a [S, d_in, R] split over d_in, b [S, R, D] whole ->
    y + (x @ a[slot]) @ b[slot], whole."""
    def apply(y, x, a, b, slot, meta):
        h = jax.lax.psum(lora_shrink(x, a, slot, backend=backend, meta=meta), TP)
        return lora_expand(y, h, b, slot, backend=backend, meta=meta)

    return _map(mesh, apply, (P(), P(None, TP), P(None, TP, None), P(), P(), P()), P())(
        y, x, a, b, slot, meta)


def attention(mesh: Mesh, q, k_cache, v_cache, layer: int, meta: RaggedMeta, dtype,
              backend, spec: AttnSpec | None = None) -> jax.Array:
    """models.ragged.ragged_attention with q [T, H, d] split over heads and the caches
    [layers, blocks, block_size, KV, d] over kv heads -> [T, H, d] split over heads. spec:
    the layer's scale, soft-cap and sliding window (static, the same on every device)."""
    def attend(q, k, v, meta):
        return ragged_attention(q, k, v, layer, meta, dtype, backend, spec)

    heads, pool = P(None, TP, None), P(None, None, None, TP, None)
    return _map(mesh, attend, (heads, pool, pool, P()), heads)(q, k_cache, v_cache, meta)
