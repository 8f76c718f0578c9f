"""One Llama decoder layer as pure functions of its (per-layer) weights, with per-token LoRA.

Numerics follow transformers' Llama: RMSNorm in float32, the residual stream and activations in
the model dtype, matmuls accumulated in float32, softmax in float32.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models import kv_cache, tp_kernels
from models.config import LlamaConfig
from models.lora import SITES, LayerLora
from models.ragged import AttnSpec, RaggedMeta, ragged_attention, write_tokens
from models.rope import apply_rope
from pallas_kernels import (
    lora_apply_split,
    lora_expand,
    lora_meta,
    lora_meta_for_site,
    lora_shrink,
)


class LayerWeights(NamedTuple):
    """One layer's weights, matrices [d_out, d_in]: qkv = [q | k | v], gate_up = [gate | up].
    The optional ones exist only where the family's switches ask for them (else None)."""

    attn_norm: jax.Array  # [D]
    qkv: jax.Array  # [(H + 2 * KV) * head_dim, D]
    o: jax.Array  # [D, H * head_dim]
    mlp_norm: jax.Array  # [D] (Gemma: pre_feedforward_layernorm)
    gate_up: jax.Array  # [2 * I, D]
    down: jax.Array  # [D, I]
    qkv_bias: jax.Array | None = None  # [(H + 2 * KV) * head_dim]: attention_bias
    q_norm: jax.Array | None = None  # [head_dim]: qk_norm
    k_norm: jax.Array | None = None  # [head_dim]: qk_norm
    post_attn_norm: jax.Array | None = None  # [D]: sandwich_norms
    post_mlp_norm: jax.Array | None = None  # [D]: sandwich_norms


class TokenBatch(NamedTuple):
    """What every layer needs to know about the tokens; shapes [B, L] unless noted."""

    positions: jax.Array  # int32, -1 = padding
    rows: jax.Array  # [B] int32 cache row of each sequence
    cos: jax.Array  # [B, L, head_dim] float32
    sin: jax.Array  # [B, L, head_dim] float32
    slot: jax.Array | None  # [B * L] int32 adapter slot per token, -1 = base
    lora_backend: str | None
    lora_dropout: tuple[jax.Array, float] | None = None  # (key, rate) on LoRA inputs: training
    kv_window: int | None = None  # static: every position in the batch is below it (None: all)
    kv_dtype: str = "float32"  # static: the dtype the KV cache holds
    ragged: RaggedMeta | None = None  # a ragged batch (B = 1, L = T tokens) over the paged pool
    attention_backend: str | None = None  # static: see models.ragged.ragged_attention
    local_rope: tuple[jax.Array, jax.Array] | None = None  # sliding layers' (cos, sin)
    lora_meta: object = None  # the step's LoRA metadata (pallas_kernels.lora_meta), built once
    # [4] bool per LoRA site (models.lora.SITES): does any of the step's adapters use it?
    # A site none uses skips its adapter work (None: every site runs).
    lora_sites: jax.Array | None = None
    mesh: Mesh | None = None  # static: a tensor-parallel mesh (Pallas kernels: shard_map)


def with_lora_meta(batch: TokenBatch, num_slots: int) -> TokenBatch:
    """The batch with its LoRA metadata: the tokens grouped by slot once per step, read by
    every layer's shrink and expand (not regrouped at each of them)."""
    if batch.slot is None:
        return batch
    return batch._replace(lora_meta=lora_meta(batch.slot, num_slots, backend=batch.lora_backend))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: bool = False) -> jax.Array:
    """x [..., D] (any dtype), weight [D] -> [..., D] in x's dtype; statistics in float32.
    offset: Gemma's x * (1 + w), the product taken in float32 before the cast (as theirs)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def norm(config: LlamaConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    """The family's RMSNorm of x with weight."""
    return rms_norm(x, weight, config.rms_norm_eps, config.norm_offset)


def project(x: jax.Array, w: jax.Array, lora_a: jax.Array | None, lora_bs: tuple,
            batch: TokenBatch, dropout_key: jax.Array | None = None,
            site: int | None = None, dtype=jnp.float32) -> jax.Array:
    """x [T, d_in] @ w [d_out, d_in]^T plus each token's adapter term -> [T, d_out] in dtype
    (the sum is float32, rounded once).

    lora_a [S, d_in, n*R] and n expand matrices [S, R, w_i] summing to d_out; None = no LoRA.
    With batch.lora_dropout the adapter sees x through dropout, as PEFT's lora_dropout does.
    site: this projection's index in models.lora.SITES; when batch.lora_sites says no adapter
    of the step uses it, the tiled backend skips its adapter work (a branch of the switch it
    runs anyway: the same program, and no stack passed through another conditional).
    """
    parts = _project_parts(x, w, None, lora_a, lora_bs, batch, dropout_key, site, dtype)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _project_parts(x: jax.Array, w: jax.Array, bias: jax.Array | None,
                   lora_a: jax.Array | None, lora_bs: tuple, batch: TokenBatch,
                   dropout_key: jax.Array | None, site: int | None, dtype,
                   widths: tuple[int, ...] | None = None) -> list[jax.Array]:
    """x @ w.T (+ bias) plus the adapter terms, as the parts of `widths` (lora_bs's widths
    when there is LoRA; None: one part), each in dtype."""
    y = matmul(x, w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if lora_a is None:
        y = y.astype(dtype)
        return [y] if widths is None else jnp.split(y, np.cumsum(widths[:-1]).tolist(), axis=-1)
    x = _dropout(x, batch, dropout_key)
    meta = batch.lora_meta
    if site is not None and batch.lora_sites is not None and meta is not None:
        meta = lora_meta_for_site(meta, batch.lora_sites[site])
    if batch.mesh is not None and tp_kernels.lora_runs_pallas(batch.lora_backend):
        return [tp_kernels.row_apply(batch.mesh, y, x, lora_a, lora_bs[0], batch.slot,
                                     batch.lora_backend, meta).astype(dtype)]  # o, down
    return lora_apply_split(y, x, lora_a, lora_bs, batch.slot, backend=batch.lora_backend,
                            meta=meta, dtype=dtype)


# Row counts for which XLA:CPU multiplies faster with the weight as the left operand (see
# matmul); outside them the usual order is as fast or faster.
WEIGHT_FIRST_ROWS = (32, 64)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [T, d_in], w [d_out, d_in] -> x @ w.T [T, d_out] float32.

    On the CPU, a product of 32-64 rows (a decode step's) is computed as w @ x.T, then
    transposed: XLA:CPU's matmul (YNNPACK) streams a wide left operand better than a wide right
    one. The barrier keeps XLA from folding the transpose back into the original order. The
    sums are the same products in another order; the README's design table has the gain."""
    if (WEIGHT_FIRST_ROWS[0] <= x.shape[0] <= WEIGHT_FIRST_ROWS[1]
            and jax.default_backend() == "cpu"):
        y = jnp.einsum("oi,ti->ot", w, x, preferred_element_type=jnp.float32)
        return jax.lax.optimization_barrier(y).T
    return jnp.einsum("ti,oi->to", x, w, preferred_element_type=jnp.float32)


def _dropout(x: jax.Array, batch: TokenBatch, key: jax.Array | None) -> jax.Array:
    if batch.lora_dropout is None:
        return x
    rate = batch.lora_dropout[1]
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def project_packed(x: jax.Array, w: jax.Array, widths: tuple[int, ...], shards: int,
                   lora_a: jax.Array | None, lora_bs: tuple, batch: TokenBatch,
                   dropout_key: jax.Array | None = None,
                   bias: jax.Array | None = None, site: int | None = None) -> list[jax.Array]:
    """A packed projection (q|k|v, gate|up) -> its parts [T, w_i] in x's dtype.

    shards > 1: w's columns are shard-major (see models.sharding), so the base matmul's output
    is cut per shard, a local split when the columns are split over the shards; each part then
    gets its own adapter expand from one shared shrink. bias [sum w_i] in w's column layout.
    """
    if shards == 1:
        return _project_parts(x, w, bias, lora_a, lora_bs, batch, dropout_key, site, x.dtype,
                              widths)
    y = matmul(x, w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    parts = split_packed(y, widths, shards)
    if lora_a is not None:
        shrink, expand = lora_shrink, lora_expand
        if batch.mesh is not None and tp_kernels.lora_runs_pallas(batch.lora_backend):
            shrink = functools.partial(tp_kernels.column_shrink, batch.mesh)
            expand = functools.partial(tp_kernels.column_expand, batch.mesh)
        h = shrink(_dropout(x, batch, dropout_key), lora_a, batch.slot,
                   backend=batch.lora_backend, meta=batch.lora_meta)
        rank = h.shape[1] // len(lora_bs)
        parts = [expand(p, h[:, i * rank:(i + 1) * rank], b, batch.slot,
                        backend=batch.lora_backend, meta=batch.lora_meta)
                 for i, (p, b) in enumerate(zip(parts, lora_bs, strict=True))]
    return [p.astype(x.dtype) for p in parts]


def split_packed(y: jax.Array, widths: tuple[int, ...], shards: int) -> list[jax.Array]:
    """y [T, sum w_i] laid out shard-major ([part 0 | part 1 | ...] of shard 0, then shard 1,
    ...) -> the parts [T, w_i] in their own column order."""
    cut = y.reshape(y.shape[0], shards, -1)
    bounds = np.cumsum([w // shards for w in widths[:-1]]).tolist()
    return [p.reshape(y.shape[0], -1) for p in jnp.split(cut, bounds, axis=-1)]


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
           spec: AttnSpec | None = None) -> jax.Array:
    """Grouped-query attention of each query over its own cache row, up to its own position.

    q [B, L, H, d]; keys, values [B, max_len, KV, d] with entry p holding position p;
    positions [B, L] (-1 = padding, which sees nothing and outputs garbage) -> [B, L, H, d].
    spec: scale, soft-cap and sliding window (None: d^-0.5, neither).
    """
    batch, length, heads, dim = q.shape
    kv_heads, max_len = keys.shape[2], keys.shape[1]
    spec = spec or AttnSpec(dim ** -0.5)
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, keys, preferred_element_type=jnp.float32)
    scores = scores * spec.scale
    if spec.softcap is not None:
        scores = jnp.tanh(scores / spec.softcap) * spec.softcap
    kpos = jnp.arange(max_len)[None, None, :]
    visible = kpos <= positions[:, :, None]  # [B, L, max_len]
    if spec.window is not None:
        visible &= kpos > positions[:, :, None] - spec.window
    # A finite floor, not -inf: padding queries see no key and must not turn into NaN.
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, dim).astype(q.dtype)


def _group(lora: LayerLora | None, a: str, *bs: str) -> tuple[jax.Array | None, tuple]:
    """One packed projection's (shrink matrix, expand matrices) for this layer, or (None, ())."""
    if lora is None:
        return None, ()
    return getattr(lora, a), tuple(getattr(lora, b) for b in bs)


def layer_spec(config: LlamaConfig, layer: int) -> AttnSpec:
    """Layer `layer`'s static attention numerics."""
    return AttnSpec(config.attention_scale, config.attn_logit_softcapping, config.window(layer))


def _rope(config: LlamaConfig, layer: int, batch: TokenBatch) -> tuple[jax.Array, jax.Array]:
    if batch.local_rope is not None and config.window(layer) is not None:
        return batch.local_rope
    return batch.cos, batch.sin


def _attention(config: LlamaConfig, normed: jax.Array, cache: tuple, layer: int,
               w: LayerWeights, lora: LayerLora | None, batch: TokenBatch, keys: list,
               shape: tuple[int, int]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """normed [B * L, D] -> (attention output [B * L, D] float32, cache with k/v written)."""
    (b, length), spec = shape, layer_spec(config, layer)
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q, k, v = project_packed(normed, w.qkv, (h * hd, kv * hd, kv * hd), config.packed_shards,
                             *_group(lora, "qkv_a", "q_b", "k_b", "v_b"), batch, keys[0],
                             w.qkv_bias, SITES.index("qkv_a"))
    q, k = q.reshape(b, length, h, hd), k.reshape(b, length, kv, hd)
    if config.qk_norm:  # per head, before RoPE
        q, k = norm(config, q, w.q_norm), norm(config, k, w.k_norm)
    cos, sin = _rope(config, layer, batch)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if batch.ragged is not None:
        meta = batch.ragged
        k_cache = write_tokens(cache[0], layer, meta.slot_mapping, k[0], batch.kv_dtype)
        v_cache = write_tokens(cache[1], layer, meta.slot_mapping,
                               v.reshape(length, kv, hd), batch.kv_dtype)
        ragged = ragged_attention
        if batch.mesh is not None and tp_kernels.attention_runs_pallas(batch.attention_backend):
            ragged = functools.partial(tp_kernels.attention, batch.mesh)
        attn = ragged(q[0], k_cache, v_cache, layer, meta, batch.kv_dtype,
                      batch.attention_backend, spec)[None]
    else:
        k_cache = kv_cache.write_layer(cache[0], layer, batch.rows, batch.positions, k,
                                       batch.kv_dtype)
        v_cache = kv_cache.write_layer(cache[1], layer, batch.rows, batch.positions,
                                       v.reshape(b, length, kv, hd), batch.kv_dtype)
        read = (kv_cache.read_layer(c, layer, batch.rows, batch.kv_dtype, batch.kv_window)
                for c in (k_cache, v_cache))
        attn = attend(q, *read, batch.positions, spec)
    attn = project(attn.reshape(b * length, h * hd), w.o, *_group(lora, "o_a", "o_b"), batch,
                   keys[1], SITES.index("o_a"), dtype=attn.dtype)
    return attn, (k_cache, v_cache)


def _activation(config: LlamaConfig, gate: jax.Array) -> jax.Array:
    """The activation computed in float32 and rounded once to gate's dtype, as PyTorch's
    kernels do for 16-bit inputs (XLA would round after each of its five operations, and on
    CPU each rounding is a convert pair over the whole [tokens, intermediate] block)."""
    x = gate.astype(jnp.float32)
    if config.hidden_act == "gelu_pytorch_tanh":
        return jax.nn.gelu(x, approximate=True).astype(gate.dtype)
    return jax.nn.silu(x).astype(gate.dtype)


def decoder_layer(
    config: LlamaConfig,
    x: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    layer: jax.Array,
    w: LayerWeights,
    lora: LayerLora | None,
    batch: TokenBatch,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B, L, D]; cache (k, v) [layers, rows, max_len, KV, d] written at `layer` -> (x, cache)."""
    b, length, d = x.shape
    # One dropout mask per packed projection (q|k|v share one; PEFT draws one per projection).
    keys = (jax.random.split(jax.random.fold_in(batch.lora_dropout[0], layer), 4)
            if batch.lora_dropout is not None else [None] * 4)

    normed = norm(config, x, w.attn_norm).reshape(b * length, d)
    attn, cache = _attention(config, normed, cache, layer, w, lora, batch, keys, (b, length))
    attn = attn.astype(x.dtype).reshape(b, length, d)
    if config.sandwich_norms:
        attn = norm(config, attn, w.post_attn_norm)
    x = x + attn

    normed = norm(config, x, w.mlp_norm).reshape(b * length, d)
    inter = config.intermediate_size
    gate, up = project_packed(normed, w.gate_up, (inter, inter), config.packed_shards,
                              *_group(lora, "gate_up_a", "gate_b", "up_b"), batch, keys[2],
                              site=SITES.index("gate_up_a"))
    hidden = _activation(config, gate) * up
    mlp = project(hidden, w.down, *_group(lora, "down_a", "down_b"), batch, keys[3],
                  SITES.index("down_a"), dtype=hidden.dtype)
    mlp = mlp.astype(x.dtype).reshape(b, length, d)
    if config.sandwich_norms:
        mlp = norm(config, mlp, w.post_mlp_norm)
    return x + mlp, cache
