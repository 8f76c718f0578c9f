"""Public entry points; `backend=` picks the implementation.

backend:
  "pallas"            Pallas kernels through Triton (GPU): per-token gather for decode, grouped
                      tensor-core blocks for prefill (see pallas_backend.py); custom_vjp gradients.
  "pallas_interpret"  the same kernels in Pallas interpret mode: any platform, for tests.
  "tiled"             plain XLA, tokens sorted by slot into tiles, each tile times its own
                      adapter, or a step with few adapters times just those (tiled.py): the cost
                      follows the step's tokens and adapters, not the number of slots.
  "dense"             plain JAX, one matmul over all slots then a per-token select (dense.py):
                      S times the minimal FLOPs, a cost that grows with every slot.
  "reference"         plain JAX per-token gather: the definition every backend must equal.
None picks "pallas" on GPU and "tiled" elsewhere. scripts/bench_kernels.py --forms compares the
plain-XLA forms over tokens, slots, ranks and distinct adapters per step.

lora_meta(slot, num_slots, backend=...) is the per-step LoRA metadata (tokens grouped by slot):
build it once per step and pass it as meta= to every shrink, expand and apply of that step, so
the grouping is not redone at every layer (vLLM's punica_wrapper.update_metadata). Without
meta= each call builds its own.

pattern ("gather" | "grouped" | None) and block_sizes (BlockSizes) tune the Pallas backends
and are ignored by the others. A slot of -1 means no adapter: that token gets exactly y back;
other slots must lie in [0, S) (not checked inside jit; the GPU kernels would read out of bounds).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import blocks, dense, pallas_backend, reference, tiled
from pallas_kernels.blocks import BlockSizes

BACKENDS = ("pallas", "pallas_interpret", "tiled", "dense", "reference")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "tiled"


def _resolve(backend, pattern, block_sizes) -> tuple[str, pallas_backend.Plan | None]:
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if not backend.startswith("pallas"):
        return backend, None
    plan = pallas_backend.Plan(
        interpret=backend == "pallas_interpret", pattern=pattern,
        blocks=block_sizes or BlockSizes(),
    )
    return backend, plan


def _check_float(name: str, value) -> None:
    if value.dtype not in DTYPES:
        raise ValueError(f"{name} has dtype {value.dtype}; expected float32, bfloat16 or float16")


def _check_rows(name: str, value, ndim: int, tokens: int | None = None) -> None:
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {value.shape}")
    if tokens is not None and value.shape[0] != tokens:
        raise ValueError(f"{name} {value.shape} has {value.shape[0]} rows, expected T={tokens}")


def _check_slot(slot, tokens: int) -> None:
    _check_rows("slot", slot, 1, tokens)
    if not jnp.issubdtype(slot.dtype, jnp.integer):
        raise ValueError(f"slot must be an integer array, got dtype {slot.dtype}")


def _check_shrink(x, a, slot) -> None:
    _check_rows("x", x, 2)
    _check_rows("a", a, 3)
    _check_float("x", x)
    _check_float("a", a)
    _check_slot(slot, x.shape[0])
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"a {a.shape} must be [S, D_in, R] (slots first) with D_in = "
                         f"x.shape[1] = {x.shape[1]}")


def _check_expand(y, h, bs, slot) -> None:
    _check_rows("y", y, 2)
    _check_float("y", y)
    tokens = y.shape[0]
    _check_rows("h", h, 2, tokens)
    _check_float("h", h)
    _check_slot(slot, tokens)
    if not bs:
        raise ValueError("expected at least one B stack")
    for i, b in enumerate(bs):
        _check_rows(f"b[{i}]", b, 3)
        _check_float(f"b[{i}]", b)
    num_slots, rank = bs[0].shape[:2]
    for i, b in enumerate(bs):
        if b.shape[:2] != (num_slots, rank):
            raise ValueError(f"b[{i}] {b.shape} must be [S={num_slots}, R={rank}, W]")
    if h.shape[1] != rank * len(bs):
        raise ValueError(f"h {h.shape} must be [T, {len(bs)} * R] with R = {rank}")
    widths = sum(b.shape[-1] for b in bs)
    if y.shape[1] != widths:
        raise ValueError(f"y {y.shape} must be [T, {widths}], the sum of the B widths")


def lora_meta(slot, num_slots: int, *, backend: str | None = None, pattern: str | None = None,
              block_sizes: BlockSizes | None = None):
    """slot [T] int32 (-1 = none), S -> the step's LoRA metadata for this backend (or None when
    the backend needs none): pass it as meta= to every call of the step with the same slot."""
    _check_rows("slot", slot, 1)
    if not jnp.issubdtype(slot.dtype, jnp.integer):
        raise ValueError(f"slot must be an integer array, got dtype {slot.dtype}")
    backend, plan = _resolve(backend, pattern, block_sizes)
    if backend == "tiled":
        return tiled.step_meta(slot, num_slots)
    if plan is not None and plan.grouped(slot.shape[0]):
        return plan.groups(slot.astype(jnp.int32), num_slots)[1]
    return None


def lora_meta_for_site(meta, used):
    """The step's metadata (from lora_meta) for one LoRA site; `used` [] bool false (no adapter
    of the step uses that site) makes the tiled backend skip its work. Other backends' metadata
    comes back as it is (they run every site)."""
    return tiled.for_site(meta, used) if isinstance(meta, tiled.LoraMeta) else meta


def _shrink(x, a, slot, backend: str, plan, meta) -> jax.Array:
    if backend == "reference":
        return reference.shrink(x, a, slot)
    if backend == "dense":
        return dense.shrink(x, a, slot)
    if backend == "tiled":
        return tiled.shrink(x, a, slot, meta)
    return pallas_backend.shrink(x, a, slot, meta, plan)


def _expand(y, h, bs: tuple, slot, backend: str, plan, meta) -> jax.Array:
    if backend == "dense":
        return dense.expand_sliced(y, h, bs, slot)
    if backend == "tiled":
        return tiled.expand_sliced(y, h, bs, slot, meta)
    if backend != "reference":
        return pallas_backend.expand(y, h, bs, slot, meta, plan)
    rank = h.shape[1] // len(bs)
    outs, start = [], 0
    for i, b in enumerate(bs):
        width = b.shape[-1]
        h_i = h[:, i * rank : (i + 1) * rank]
        outs.append(reference.expand(y[:, start : start + width], h_i, b, slot))
        start += width
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def lora_shrink(
    x, a, slot, *, backend: str | None = None, pattern: str | None = None,
    block_sizes: BlockSizes | None = None, meta=None,
) -> jax.Array:
    """x [T, D_in], a [S, D_in, R], slot [T] int32 (-1 = none) -> [T, R] float32."""
    _check_shrink(x, a, slot)
    return _shrink(x, a, slot, *_resolve(backend, pattern, block_sizes), meta)


def lora_expand(
    y, h, b, slot, *, backend: str | None = None, pattern: str | None = None,
    block_sizes: BlockSizes | None = None, meta=None,
) -> jax.Array:
    """y [T, D_out], h [T, R], b [S, R, D_out], slot [T] -> y + h @ b[slot], y's dtype."""
    _check_expand(y, h, (b,), slot)
    resolved = _resolve(backend, pattern, block_sizes)
    if resolved[1] is not None:
        blocks.check_rank(b.shape[1])
    return _expand(y, h, (b,), slot, *resolved, meta)


def lora_apply(
    y, x, a, b, slot, *, backend: str | None = None, pattern: str | None = None,
    block_sizes: BlockSizes | None = None, meta=None,
) -> jax.Array:
    """y [T, D_out], x [T, D_in], a [S, D_in, R], b [S, R, D_out]
    -> y + (x @ a[slot]) @ b[slot]."""
    return lora_apply_sliced(y, x, a, (b,), slot, backend=backend, pattern=pattern,
                             block_sizes=block_sizes, meta=meta)


def _check_apply(y, x, a, bs: tuple, slot) -> None:
    _check_shrink(x, a, slot)
    if a.shape[-1] % max(len(bs), 1):
        raise ValueError(f"a {a.shape}: its rank axis must split into {len(bs)} equal slices")
    h_shape = jax.ShapeDtypeStruct((x.shape[0], a.shape[-1]), jnp.float32)
    _check_expand(y, h_shape, bs, slot)
    if a.shape[0] != bs[0].shape[0]:
        raise ValueError(f"a has S={a.shape[0]} slots but b has S={bs[0].shape[0]}")


def lora_apply_sliced(
    y, x, a, bs: Sequence[jax.Array], slot, *, backend: str | None = None,
    pattern: str | None = None, block_sizes: BlockSizes | None = None, meta=None,
) -> jax.Array:
    """Fused projection: y [T, sum(w_i)], x [T, D_in], a [S, D_in, n*R], bs n arrays [S, R, w_i].

    Slice i of the output gets (x @ a[slot, :, i*R:(i+1)*R]) @ bs[i][slot].
    """
    bs = tuple(bs)
    _check_apply(y, x, a, bs, slot)
    resolved = _resolve(backend, pattern, block_sizes)
    if resolved[1] is not None:
        blocks.check_rank(bs[0].shape[1])
    if resolved[0] == "dense":
        return dense.apply_sliced(y, x, a, bs, slot)
    if resolved[0] == "tiled":
        return tiled.apply_sliced(y, x, a, bs, slot, meta)
    h = _shrink(x, a, slot, *resolved, meta)
    return _expand(y, h, bs, slot, *resolved, meta)


def lora_apply_split(
    y, x, a, bs: Sequence[jax.Array], slot, *, backend: str | None = None,
    pattern: str | None = None, block_sizes: BlockSizes | None = None, meta=None, dtype=None,
) -> list[jax.Array]:
    """lora_apply_sliced, returned as its slices [T, w_i], each cast to dtype (default y's).

    The tiled backend adds inside its branch switch, so a step that skips the site only
    splits y; the other backends split lora_apply_sliced's result."""
    bs = tuple(bs)
    dtype = y.dtype if dtype is None else dtype
    if _resolve(backend, pattern, block_sizes)[0] == "tiled":
        _check_apply(y, x, a, bs, slot)
        return tiled.apply_split(y, x, a, bs, slot, meta, dtype)
    out = lora_apply_sliced(y, x, a, bs, slot, backend=backend, pattern=pattern,
                            block_sizes=block_sizes, meta=meta)
    bounds = np.cumsum([b.shape[-1] for b in bs[:-1]]).tolist()
    return [part.astype(dtype) for part in jnp.split(out, bounds, axis=-1)]
