"""The kernels of a tensor-parallel model (models.tp_kernels: LoRA and ragged paged attention
under shard_map) lower for NVIDIA GPUs, each device running the Triton kernel on its shard.

Exported for platform "cuda" over an abstract mesh, so no GPU (and no device count) is needed;
the shapes are Llama-3-70B's at TP=8 (hidden 8192, 64 heads and 8 kv heads of 128,
intermediate 28672: per shard 8 heads, 1 kv head, 3584).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractMesh

from models import tp_kernels
from models.ragged import AttnSpec, RaggedMeta
from pallas_kernels import lora_meta

TRITON = "__gpu$xla.gpu.triton"
TP = 8
MESH = AbstractMesh((TP,), (tp_kernels.TP,))
BF16 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)


def _ints(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def _module(fn, *args) -> str:
    exported = export.export(jax.jit(fn), platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
                             )(*args)
    return exported.mlir_module()


def _per_shard(text: str) -> str:
    """The body each device runs: the module after its manual (shard_map) computation."""
    assert "sdy.manual_computation" in text and 'manual_axes={"tp"}' in text
    assert "mosaic" not in text.lower()
    return text[text.index("sdy.manual_computation"):]


@pytest.mark.parametrize("tokens", [32, 512], ids=["decode", "prefill"])
@pytest.mark.parametrize("width", [8192, 1024, 28672], ids=["q", "kv", "gate_up"])
def test_column_parallel_expand_runs_the_kernel_on_each_devices_columns(width, tokens):
    t, rank = tokens, 16
    text = _module(functools.partial(tp_kernels.column_expand, MESH, backend="pallas"),
                   BF16((t, width)), jax.ShapeDtypeStruct((t, rank), jnp.float32),
                   BF16((4, rank, width)), _ints(t))
    body = _per_shard(text)
    assert body.count(TRITON) == 1
    assert f"tensor<4x{rank}x{width // TP}xbf16>" in body  # the device's columns of B


def test_column_parallel_shrink_runs_whole_on_every_device():
    text = _module(functools.partial(tp_kernels.column_shrink, MESH, backend="pallas"),
                   BF16((32, 8192)), BF16((4, 8192, 48)), _ints(32))
    body = _per_shard(text)
    assert body.count(TRITON) == 1 and "tensor<4x8192x48xbf16>" in body


@pytest.mark.parametrize("d_in", [8192, 28672], ids=["o", "down"])
def test_row_parallel_lora_shrinks_each_devices_rows_and_sums_over_devices(d_in):
    text = _module(functools.partial(tp_kernels.row_apply, MESH, backend="pallas"),
                   BF16((32, 8192)), BF16((32, d_in)), BF16((4, d_in, 16)),
                   BF16((4, 16, 8192)), _ints(32))
    body = _per_shard(text)
    assert body.count(TRITON) == 2  # shrink, expand
    assert f"tensor<4x{d_in // TP}x16xbf16>" in body  # the device's rows of A
    assert "all_reduce" in body  # the [T, R] partial shrinks summed


def _attention_module(tokens: int, spec: AttnSpec | None = None) -> str:
    seqs, pages, block = 64, 128, 16
    meta = RaggedMeta(*(_ints(tokens) for _ in range(3)), _ints(seqs, pages),
                      *(_ints(seqs) for _ in range(2)), *(_ints(1) for _ in range(3)),
                      _ints(seqs + 1), _ints(seqs), _ints(1))
    pool = BF16((1, seqs * pages, block, 8, 128))
    fn = functools.partial(tp_kernels.attention, MESH, layer=0, dtype=jnp.bfloat16,
                           backend="pallas", spec=spec)
    return _module(lambda q, k, v, meta: fn(q, k, v, meta=meta), BF16((tokens, 64, 128)),
                   pool, pool, meta)


@pytest.mark.parametrize("tokens", [64, 512], ids=["decode", "prefill"])
def test_attention_runs_the_kernel_on_each_devices_heads_and_kv_heads(tokens):
    seqs, pages, block = 64, 128, 16
    body = _per_shard(_attention_module(tokens))
    assert body.count(TRITON) == 1
    assert f"tensor<{tokens}x8x128xbf16>" in body  # 8 query heads a device
    assert f"tensor<{seqs * pages}x{block}x1x128xbf16>" in body  # its one kv head


def test_sharded_attention_passes_the_layers_window_and_soft_cap_to_the_kernel():
    """Gemma 2's sliding layers (window 4096, soft-cap 50) under shard_map: each device's
    kernel is the windowed, soft-capped one, not the full-attention one."""
    full = _per_shard(_attention_module(512))
    windowed = _per_shard(_attention_module(512, AttnSpec(128 ** -0.5, 50.0, 4096)))
    assert windowed.count(TRITON) == 1
    assert windowed != full


def test_row_parallel_kernels_read_the_steps_grouping_built_once_outside():
    """A prefill step's tokens grouped by slot (pallas_kernels.lora_meta) once, replicated
    into each device's shrink and expand: no device sorts the tokens again."""
    def step(y, x, a, b, slot):
        meta = lora_meta(slot, 4, backend="pallas")
        return tp_kernels.row_apply(MESH, y, x, a, b, slot, "pallas", meta)

    args = (BF16((512, 8192)), BF16((512, 8192)), BF16((4, 8192, 16)), BF16((4, 16, 8192)),
            _ints(512))
    grouped = _module(step, *args)
    alone = _module(functools.partial(tp_kernels.row_apply, MESH, backend="pallas"), *args)
    assert _per_shard(grouped).count(TRITON) == 2
    # Without the step's grouping each kernel call sorts the tokens itself, on each device.
    manual = alone.index("sdy.manual_computation")
    assert [i > manual for i in _sorts(alone)] == [True, True]
    manual = grouped.index("sdy.manual_computation")
    assert [i > manual for i in _sorts(grouped)] == [False]


def _sorts(text: str) -> list[int]:
    """Where the module calls its token sort (pallas_kernels.grouping's argsort)."""
    return [m.start() for m in re.finditer(r"call @argsort", text)]
