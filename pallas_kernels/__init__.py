"""Gathered per-token LoRA matmuls over stacked adapter tensors.

Public API (see api.py for shapes and backends):
    lora_shrink(x, a, slot)            -> [T, R] float32
    lora_expand(y, h, b, slot)         -> y + h @ b[slot]
    lora_apply(y, x, a, b, slot)       -> y + (x @ a[:, slot]) @ b[slot]   a [D_in, S, R]
    lora_apply_sliced(y, x, a, bs, slot) fused projections (q|k|v, gate|up)
    group_by_slot / gather_rows / scatter_rows: the token grouping of the prefill kernels
"""

from pallas_kernels.api import (
    BACKENDS,
    default_backend,
    lora_apply,
    lora_apply_sliced,
    lora_expand,
    lora_shrink,
)
from pallas_kernels.blocks import BlockSizes
from pallas_kernels.grouping import Groups, gather_rows, group_by_slot, scatter_rows

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "Groups",
    "default_backend",
    "gather_rows",
    "group_by_slot",
    "lora_apply",
    "lora_apply_sliced",
    "lora_expand",
    "lora_shrink",
    "scatter_rows",
]
