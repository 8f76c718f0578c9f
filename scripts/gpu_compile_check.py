"""Compile every Pallas kernel to H200 (sm_90a) machine code on any machine, and report its cost.

jax.export lowers the kernels for CUDA without a GPU; each `__gpu$xla.gpu.triton` custom call
carries the Triton IR (MLIR bytecode) and its num_warps / num_stages in mhlo.backend_config.
Triton compiles that IR to PTX and its bundled ptxas to a cubin, whose `-v` report gives
registers, spills and shared memory. Prints a JSON table; exits 1 on a compile error, a spill or
an occupancy under MIN_WARPS_PER_SM.

    python scripts/gpu_compile_check.py [--small]
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import export

import pallas_kernels as pk
from pallas_kernels.attention import ragged_paged_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
# jaxlib minor version -> the Triton whose MLIR reads the IR that jaxlib emits (others refuse it).
MATCHING_TRITON = {"0.10": "3.8.0"}
# H100/H200 per-SM limits.
SM_REGS, SM_SMEM, SM_WARPS, MAX_REGS = 65536, 228 * 1024, 64, 255
# Reasonable occupancy: a quarter of the SM's warps (at most 128 registers a thread), enough for
# the memory-bound LoRA and attention kernels to hide load latency; blocks.py sizes tiles for it.
MIN_WARPS_PER_SM = 16

# Kernel registry: (name, builder(dtype, shape) -> (fn, args), full shapes, small shapes).
# A new kernel is one entry in CASES.


def _lora_case(pattern: str, backward: bool):
    def build(dtype, shape):
        tokens, d_in, d_out, slots, rank = shape
        spec = functools.partial(jax.ShapeDtypeStruct, dtype=dtype)
        args = (spec((tokens, d_out)), spec((tokens, d_in)), spec((slots, d_in, rank)),
                (spec((slots, rank, d_out)),), jax.ShapeDtypeStruct((tokens,), jnp.int32))
        apply = functools.partial(pk.lora_apply_sliced, backend="pallas", pattern=pattern)
        if not backward:
            return apply, args

        def loss(y, x, a, bs, slot):
            return jnp.sum(apply(y, x, a, bs, slot).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3)), args
    return build


def _attention_case(dtype, shape, **extra):
    tokens, heads, kv_heads, dim, block_size, num_seqs, max_blocks = shape
    pages = jax.ShapeDtypeStruct((num_seqs * max_blocks, block_size, kv_heads, dim), dtype)

    def ints(*s):
        return jax.ShapeDtypeStruct(s, jnp.int32)
    args = (jax.ShapeDtypeStruct((tokens, heads, dim), dtype), pages, pages, ints(num_seqs),
            ints(num_seqs, max_blocks), ints(num_seqs + 1), ints(1))
    return functools.partial(ragged_paged_attention, backend="pallas", **extra), args


# (T, D_in, D_out, S, R): Llama-3-8B q / down (decode, prefill); Llama-3-70B per-shard (TP=8).
# Then max_loras 64 and 256 at rank 16 on the bench model (hidden 1024, mlp 2816) and
# Llama-3-8B: the slot count only sizes the stacks each program indexes (a_ref[slot] loads one
# slot's tile), so registers, shared memory and the grid must not change with it.
LORA_SHAPES = [(32, 4096, 4096, 16, 16), (1024, 4096, 4096, 8, 64), (8, 14336, 4096, 64, 8),
               (512, 8192, 1024, 4, 32), (32, 3584, 8192, 32, 16)]
LORA_SHAPES += [(t, d_in, d_out, s, 16) for s in (8, 64, 256) for t in (64, 1024)
                for d_in, d_out in ((1024, 1024), (2816, 1024), (4096, 4096), (14336, 4096))]
LORA_SMALL = [(32, 4096, 4096, 16, 16), (1024, 4096, 4096, 8, 64), (64, 4096, 4096, 256, 16)]
# (T, H, KV, d, block_size, S, MB): Llama-3-8B, 64 decode rows and a 512-token prefill mix over
# 2048-token block tables. The tiles depend on G, d, block_size and dtype, not on T or S.
ATTENTION_SHAPES = [(64, 32, 8, 128, 16, 64, 128), (512, 32, 8, 128, 16, 64, 128)]


def _tp_case(dtype, shape):
    """A kernel of a tensor-parallel model under shard_map (models.tp_kernels) over an
    abstract mesh of `tp` devices, built from the whole model's shapes: the Triton calls are
    the per-shard ones. shape: (kind, tp, T, ...) with kind one of TP_KINDS."""
    from jax.sharding import AbstractMesh

    from models import tp_kernels
    from models.ragged import AttnSpec, RaggedMeta

    kind, tp, tokens, *rest = shape
    mesh = AbstractMesh((tp,), (tp_kernels.TP,))
    spec = functools.partial(jax.ShapeDtypeStruct, dtype=dtype)

    def ints(*s):
        return jax.ShapeDtypeStruct(s, jnp.int32)
    if kind.startswith("attention"):  # "attention_windowed_softcap": Gemma 2's switches
        heads, kv_heads, dim, block_size, num_seqs, max_blocks = rest
        spec_ = AttnSpec(dim ** -0.5, *((50.0, 4096) if kind != "attention" else ()))
        pool = spec((1, num_seqs * max_blocks, block_size, kv_heads, dim))
        meta = RaggedMeta(*(ints(tokens) for _ in range(3)), ints(num_seqs, max_blocks),
                          *(ints(num_seqs) for _ in range(2)), *(ints(1) for _ in range(3)),
                          ints(num_seqs + 1), ints(num_seqs), ints(1))
        fn = functools.partial(tp_kernels.attention, mesh, layer=0, dtype=dtype,
                               backend="pallas", spec=spec_)
        return (lambda q, k, v, meta: fn(q, k, v, meta=meta)), (
            spec((tokens, heads, dim)), pool, pool, meta)
    d_in, d_out, slots, rank = rest
    slot = ints(tokens)
    if kind == "row_apply":  # o / down: input split, output whole
        return functools.partial(tp_kernels.row_apply, mesh, backend="pallas"), (
            spec((tokens, d_out)), spec((tokens, d_in)), spec((slots, d_in, rank)),
            spec((slots, rank, d_out)), slot)
    h = jax.ShapeDtypeStruct((tokens, rank), jnp.float32)  # column-parallel expand
    return functools.partial(tp_kernels.column_expand, mesh, backend="pallas"), (
        spec((tokens, d_out)), h, spec((slots, rank, d_out)), slot)


# Llama-3-70B at TP=8 (hidden 8192, 64 heads and 8 kv heads of 128, intermediate 28672): per
# shard 8 heads, 1 kv head, 3584 of the intermediate. (kind, tp, T, ...) as _tp_case reads it.
TP_SHAPES = [("column_expand", 8, 32, 8192, 8192, 16, 16),   # q
             ("column_expand", 8, 512, 8192, 1024, 4, 32),   # k, v
             ("column_expand", 8, 32, 8192, 28672, 16, 16),  # gate, up
             ("row_apply", 8, 32, 8192, 8192, 16, 16),       # o
             ("row_apply", 8, 512, 28672, 8192, 4, 32),      # down
             ("attention", 8, 64, 64, 8, 128, 16, 64, 128),
             ("attention", 8, 512, 64, 8, 128, 16, 64, 128),
             ("attention_windowed_softcap", 8, 512, 64, 8, 128, 16, 64, 128)]
TP_SMALL = [TP_SHAPES[2], TP_SHAPES[4], TP_SHAPES[5], TP_SHAPES[7]]
CASES = [(f"lora_{p}_{d}", _lora_case(p, d == "bwd"), LORA_SHAPES, LORA_SMALL)
         for p in ("gather", "grouped") for d in ("fwd", "bwd")]
CASES.append(("ragged_paged_attention", _attention_case, ATTENTION_SHAPES, ATTENTION_SHAPES[:1]))
# Sliding layers (Mistral, Qwen2, Gemma 3, Phi-3): a window, its mask and its skipped chunks;
# Gemma 2's add the attention soft-cap.
CASES.append(("ragged_paged_attention_windowed",
              functools.partial(_attention_case, sliding_window=4096),
              ATTENTION_SHAPES, ATTENTION_SHAPES[:1]))
CASES.append(("ragged_paged_attention_windowed_softcap",
              functools.partial(_attention_case, sliding_window=4096, soft_cap=50.0),
              ATTENTION_SHAPES, ATTENTION_SHAPES[:1]))
CASES.append(("tp8_llama3_70b", _tp_case, TP_SHAPES, TP_SMALL))
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def check_triton() -> str | None:
    """The problem with the installed Triton in one line, or None when it matches jaxlib."""
    import jaxlib
    minor = ".".join(jaxlib.__version__.split(".")[:2])
    want = MATCHING_TRITON.get(minor)
    if want is None:
        return f"no known Triton matches jaxlib {jaxlib.__version__}: extend MATCHING_TRITON"
    try:
        import triton
    except ImportError:
        return f"triton is not installed: pip install triton=={want} (jaxlib {jaxlib.__version__})"
    if triton.__version__ != want:
        return f"triton {triton.__version__} cannot read jaxlib {minor} IR: need triton=={want}"
    return None


def _unescape(s: str) -> bytes:
    """MLIR string literal -> bytes (\\XX hex escapes, \\\\, \\\")."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] == "\\":
            if s[i + 1] in '\\"':
                out.append(ord(s[i + 1]))
                i += 2
            else:
                out.append(int(s[i + 1:i + 3], 16))
                i += 3
        else:
            out += s[i].encode()
            i += 1
    return bytes(out)


CALL_RE = re.compile(r'ir = "((?:[^"\\]|\\.)*)", name = "([^"]*)", num_stages = (\d+) : i32, '
                     r"num_warps = (\d+) : i32")


def triton_calls(fn, args):
    text = export.export(jax.jit(fn), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
                         )(*args).mlir_module()
    return [(_unescape(ir), name, int(st), int(w)) for ir, name, st, w in CALL_RE.findall(text)]


def compile_sm90(ir: bytes, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        # Triton's IRSource reads text, so print the bytecode as MLIR text with its own parser.
        from triton._C.libtriton import ir as tir
        raw = os.path.join(tmp, "raw.mlirbc")
        with open(raw, "wb") as f:
            f.write(ir)
        context = tir.context()
        tir.load_dialects(context)
        triton.compiler.make_backend(GPUTarget("cuda", 90, 32)).load_dialects(context)
        src = os.path.join(tmp, "kernel.ttir")
        with open(src, "w") as f:
            f.write(str(tir.parse_mlir_module(raw, context)))
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log)[1])
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill", log))
    smem_log = [int(n) for n in re.findall(r"(\d+) bytes smem", log)]
    smem = max([int(kernel.metadata.shared), *smem_log])
    warps_by_regs = SM_REGS // (max(regs, 1) * 32 * num_warps) * num_warps
    warps_by_smem = SM_SMEM // smem * num_warps if smem else SM_WARPS
    return {"registers": regs, "spill_bytes": spill, "shared_bytes": smem,
            "num_warps": num_warps, "num_stages": num_stages,
            "warps_per_sm": min(SM_WARPS, warps_by_regs, warps_by_smem)}


def run(small: bool, dtypes=DTYPES, cases=CASES) -> list[dict]:
    rows = []
    for name, build, full_shapes, small_shapes in cases:
        for shape in small_shapes if small else full_shapes:
            for dname, dtype in dtypes.items():
                for ir, kname, stages, warps in triton_calls(*build(dtype, shape)):
                    rows.append({"kernel": name, "call": kname, "shape": list(shape),
                                 "dtype": dname, **compile_sm90(ir, warps, stages)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the test's shapes only")
    opts = parser.parse_args(argv)
    problem = check_triton()
    if problem:
        print(problem)
        return 2
    rows = run(opts.small)
    print(json.dumps(rows, indent=None, separators=(",", ":")).replace("},{", "},\n{"))
    spills = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} kernels compiled; {len(spills)} spill; registers "
          f"{min(r['registers'] for r in rows)}-{max(r['registers'] for r in rows)}; warps/SM "
          f"{min(r['warps_per_sm'] for r in rows)}-{max(r['warps_per_sm'] for r in rows)}",
          file=sys.stderr)
    low = [r for r in rows if r["warps_per_sm"] < MIN_WARPS_PER_SM]
    return 1 if spills or low else 0


if __name__ == "__main__":
    sys.exit(main())
