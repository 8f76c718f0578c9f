"""Every Pallas kernel lowers for NVIDIA GPUs through the Triton backend, checked on any machine.

jax.export runs Pallas' Triton lowering for platform "cuda" without a GPU; the module must hold
Triton calls (not Mosaic GPU ones). Triton's own PTX compile only happens on a GPU
(scripts/gpu_check.sh).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels as pk

TRITON = "__gpu$xla.gpu.triton"

# (T, D_in, D_out, S, R, widths): Llama-7B decode and prefill sizes, odd sizes, fused q|k|v.
SHAPES = {
    "llama_decode": (32, 4096, 4096, 16, 16, (4096,)),
    "llama_prefill": (1024, 4096, 4096, 8, 16, (4096,)),
    "odd": (13, 96, 80, 1, 8, (80,)),
    "qkv_rank1": (24, 64, 64, 4, 1, (32, 16, 16)),
    "qkv_rank64": (40, 128, 256, 4, 64, (128, 64, 64)),
    # Hundreds of slots (max_loras up to 256): the slot axis only offsets each program's loads.
    "llama3_8b_qkv_slots256": (64, 4096, 6144, 256, 16, (4096, 1024, 1024)),
    "bench_prefill_slots64": (1024, 1024, 1024, 64, 16, (1024,)),
}


def _triton_calls(fn, *args) -> str:
    exported = export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                         ids=lambda d: d.__name__)
@pytest.mark.parametrize("pattern", ["gather", "grouped"])
def test_forward_and_backward_kernels_lower_through_triton(pattern, dtype, shape):
    tokens, d_in, _, num_slots, rank, widths = SHAPES[shape]
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=dtype)
    args = (
        spec((tokens, sum(widths))), spec((tokens, d_in)),
        spec((num_slots, d_in, rank * len(widths))),
        tuple(spec((num_slots, rank, w)) for w in widths),
        jax.ShapeDtypeStruct((tokens,), jnp.int32),
    )
    apply = functools.partial(pk.lora_apply_sliced, backend="pallas", pattern=pattern)

    def loss(y, x, a, bs, slot):
        return jnp.sum(apply(y, x, a, bs, slot).astype(jnp.float32))

    forward = _triton_calls(apply, *args)
    # One shrink, one expand per slice.
    assert forward.count("xla.gpu.triton") == 1 + len(widths)
    backward = _triton_calls(jax.grad(loss, argnums=(0, 1, 2, 3)), *args)
    # Forward shrink (h feeds db), a shrink per slice (dh), an expand per rank chunk (dx).
    assert backward.count("xla.gpu.triton") >= 1 + len(widths) + 1
    assert "mosaic" not in forward.lower() + backward.lower()


@pytest.mark.parametrize("pattern", ["gather", "grouped"])
def test_one_steps_metadata_feeds_every_site_and_groups_once(pattern):
    tokens, d_in, num_slots, rank = 1024, 1024, 256, 16
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.bfloat16)
    kw = dict(backend="pallas", pattern=pattern)

    def step(y, x, a, b, slot):
        meta = pk.lora_meta(slot, num_slots, **kw)  # once per step
        for _ in range(3):  # three layers' sites
            y = pk.lora_apply(y, x, a, b, slot, meta=meta, **kw)
        return y

    text = _triton_calls(step, spec((tokens, d_in)), spec((tokens, d_in)),
                         spec((num_slots, d_in, rank)), spec((num_slots, rank, d_in)),
                         jax.ShapeDtypeStruct((tokens,), jnp.int32))
    assert "xla.gpu.triton" in text
    # The grouped pattern sorts the step's tokens by slot once, not at every site.
    assert text.count("stablehlo.sort") == (1 if pattern == "grouped" else 0)
