"""Ragged paged attention: decode rows and prefill chunks of many sequences in one call, over a
paged KV cache (api.py for shapes and backends; kernel.py the Pallas kernel, reference.py its
plain-JAX definition)."""

from pallas_kernels.attention.api import BACKENDS, default_backend, ragged_paged_attention

__all__ = ["BACKENDS", "default_backend", "ragged_paged_attention"]
