"""Gathered per-token LoRA matmuls over stacked adapter tensors.

Public API (see api.py for shapes and backends):
    lora_shrink(x, a, slot)            -> [T, R] float32
    lora_expand(y, h, b, slot)         -> y + h @ b[slot]
    lora_meta(slot, S)                 the step's LoRA metadata (tokens grouped by slot): built
                                       once per step, passed as meta= to every call
    lora_meta_for_site(meta, used)     that metadata for one LoRA site; used false: the tiled
                                       backend skips the site's work
    lora_apply(y, x, a, b, slot)       -> y + (x @ a[slot]) @ b[slot]   a [S, D_in, R]
    lora_apply_sliced(y, x, a, bs, slot) fused projections (q|k|v, gate|up)
    lora_apply_split(y, x, a, bs, slot)  the same, as its slices (cast to dtype=)
    group_by_slot / gather_rows / scatter_rows: the token grouping of the prefill kernels
    ragged_paged_attention(q, k_pages, v_pages, kv_lens, block_tables, query_start, num_seqs)
                                       decode rows and prefill chunks over a paged KV cache
                                       (attention/api.py)
"""

from pallas_kernels.api import (
    BACKENDS,
    default_backend,
    lora_apply,
    lora_apply_sliced,
    lora_apply_split,
    lora_expand,
    lora_meta,
    lora_meta_for_site,
    lora_shrink,
)
from pallas_kernels.attention import ragged_paged_attention
from pallas_kernels.blocks import BlockSizes
from pallas_kernels.grouping import Groups, gather_rows, group_by_slot, scatter_rows
from pallas_kernels.tiled import LoraMeta

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "Groups",
    "LoraMeta",
    "default_backend",
    "gather_rows",
    "group_by_slot",
    "lora_apply",
    "lora_apply_sliced",
    "lora_apply_split",
    "lora_expand",
    "lora_meta",
    "lora_meta_for_site",
    "lora_shrink",
    "ragged_paged_attention",
    "scatter_rows",
]
