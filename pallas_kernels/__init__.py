"""Gathered per-token LoRA matmuls over stacked adapter tensors.

Public API (see api.py for shapes):
    lora_shrink(x, a, slot)            -> [T, R] float32
    lora_expand(y, h, b, slot)         -> y + h @ b[slot]
    lora_apply(y, x, a, b, slot)       -> y + (x @ a[slot]) @ b[slot]
    lora_apply_sliced(y, x, a, bs, slot) fused projections (q|k|v, gate|up)
"""

from pallas_kernels.api import lora_apply, lora_apply_sliced, lora_expand, lora_shrink

__all__ = ["lora_apply", "lora_apply_sliced", "lora_expand", "lora_shrink"]
