"""The Llama model (Flax NNX): one module per layer, unrolled; LoRA and KV cache are arguments.

Why not stacked layers under lax.scan: the dot thunks of XLA:CPU need each layer's weights as a
buffer of their own, so a scan (or any slice of a stacked parameter) copies every layer's weights
before its matmuls, on every step (the README's design measurements give the cost). Unrolled
layers compile a little slower, once per shape bucket.

Jit it the way Flax's performance guide recommends: `graphdef, state = nnx.split(model)` once,
then `nnx.merge(graphdef, state)` inside your own jax.jit (or jit `forward`, graphdef static).
Weights then stay arguments of the compiled function, never constants baked into it.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.kv_cache import KVCache
from models.layers import LayerWeights, TokenBatch, decoder_layer, matmul, rms_norm, with_lora_meta
from models.lora import LoraStacks
from models.ragged import RaggedMeta
from models.rope import rope_cos_sin

# Logical axes of every parameter, by name (models.sharding maps them to mesh axes). "qkv" and
# "gate_up" are the packed output axes: split over tensor parallelism only in their shard-major
# layout (LlamaConfig.packed_shards), where each shard's rows are its own q|k|v (gate|up).
PARAM_AXES = {
    "embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"), "norm": ("embed",),
    "attn_norm": ("embed",), "qkv": ("qkv", "embed"), "o": ("embed", "heads"),
    "mlp_norm": ("embed",), "gate_up": ("gate_up", "embed"), "down": ("embed", "mlp"),
    # Family switches: biases split with their columns, norms replicated.
    "qkv_bias": ("qkv",), "q_norm": ("head_dim",), "k_norm": ("head_dim",),
    "post_attn_norm": ("embed",), "post_mlp_norm": ("embed",),
}


class DecoderLayer(nnx.Module):
    """One layer's weights; matrices stored [d_out, d_in] as Hugging Face stores them (XLA:CPU's
    matmuls read weights stored output-major faster at decode sizes; see the README's design
    measurements), q|k|v and gate|up packed."""

    def __init__(self, config: LlamaConfig, dtype, rngs: nnx.Rngs):
        d, i = config.hidden_size, config.intermediate_size
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        normal = nnx.initializers.normal(0.02)

        def init(d_in: int, d_out: int) -> nnx.Param:  # drawn [d_in, d_out], as always
            return nnx.Param(normal(rngs.params(), (d_in, d_out), dtype).T)

        self.attn_norm = norm_param(config, d, dtype)
        self.qkv = init(d, q + 2 * kv)
        self.o = init(q, d)
        self.mlp_norm = norm_param(config, d, dtype)
        self.gate_up = init(d, 2 * i)
        self.down = init(i, d)
        if config.attention_bias:
            self.qkv_bias = nnx.Param(jnp.zeros((q + 2 * kv,), dtype))
        if config.qk_norm:
            self.q_norm = norm_param(config, config.head_dim, dtype)
            self.k_norm = norm_param(config, config.head_dim, dtype)
        if config.sandwich_norms:
            self.post_attn_norm = norm_param(config, d, dtype)
            self.post_mlp_norm = norm_param(config, d, dtype)

    def weights(self) -> LayerWeights:
        return LayerWeights(*(getattr(self, name)[...] if hasattr(self, name) else None
                              for name in LayerWeights._fields))


def norm_param(config: LlamaConfig, size: int, dtype) -> nnx.Param:
    """An RMSNorm weight that starts as the identity (0 where the norm scales by 1 + w)."""
    return nnx.Param((jnp.zeros if config.norm_offset else jnp.ones)((size,), dtype))


class Llama(nnx.Module):
    """A Llama causal LM. Random weights from `rngs`; use `load_llama` for a checkpoint.

    Params: embed [V, D]; layers (a list of DecoderLayer, [d_out, d_in]); norm [D];
    lm_head [V, D] (Hugging Face's layout, as the embedding: XLA:CPU's matmul reads weights
    stored output-major about twice as fast at decode sizes), or None when tied to the embedding.
    """

    def __init__(self, config: LlamaConfig, *, dtype="float32", rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        v, d = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (v, d), self.dtype))
        self.layers = nnx.List([DecoderLayer(config, self.dtype, rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = norm_param(config, d, self.dtype)
        # Drawn [D, V] and stored transposed: the same initial values as the [D, V] layout had.
        self.lm_head = (None if config.tie_word_embeddings else nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (d, v), self.dtype).T))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_cache: KVCache,
        cache_rows: jax.Array,
        lora: LoraStacks | None = None,
        adapter_slot: jax.Array | None = None,
        rope_scale: jax.Array | None = None,
        *,
        lora_backend: str | None = None,
        lora_dropout: tuple[jax.Array, float] | None = None,
        kv_window: int | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Prefill or decode a batch of sequences through the cache.

        tokens, positions [B, L] int32 (position -1 = padding: not written, not attended, its
        output is garbage); cache_rows [B] int32 (one block per sequence: the row cache) or
        block tables [B, MB] int32 into the paged pool (see models.kv_cache); lora: LoraStacks
        (every slot, per layer) or None;
        adapter_slot [B] int32 (-1 = base model); rope_scale [B] float32 (RoPE sees
        position / rope_scale) or None -> (hidden [B, L, D] after the final norm, kv_cache).
        Token (b, l) attends to row cache_rows[b] at positions <= positions[b, l].
        lora_dropout (key, rate): PEFT's lora_dropout on every adapter's input (training).
        kv_window (static int): attend over only the first kv_window cache positions; every
        position in the batch must be below it (None = the whole row).
        """
        config = self.config
        if tokens.shape != positions.shape or tokens.ndim != 2:
            raise ValueError(f"tokens {tokens.shape} and positions {positions.shape} must both "
                             "be [batch, length]")
        for name, value in (("cache_rows", cache_rows), ("adapter_slot", adapter_slot),
                            ("rope_scale", rope_scale)):
            tables = name == "cache_rows" and value is not None and value.ndim == 2
            if value is not None and value.shape[:1 if tables else None] != tokens.shape[:1]:
                raise ValueError(f"{name} has shape {value.shape}, expected [batch] = "
                                 f"{tokens.shape[:1]}")
        if lora is not None and adapter_slot is None:
            raise ValueError("adapter_slot is required when lora stacks are given")
        slot = None
        if lora is not None:
            # Padding tokens take no adapter, so kernels that group by slot skip them.
            slot = jnp.where(positions >= 0, adapter_slot[:, None], -1).astype(jnp.int32)
            slot = slot.reshape(-1)
        cos, sin = rope_cos_sin(config, positions, rope_scale)
        batch = TokenBatch(positions, cache_rows, cos, sin, slot, lora_backend, lora_dropout,
                           kv_window, kv_cache.dtype,
                           local_rope=_local_rope(config, positions, rope_scale))
        if lora is not None:
            batch = with_lora_meta(batch, lora.num_slots)
        x, cache = self._layers(self._embed(tokens), kv_cache, lora, batch)
        return self._final_norm(x), cache

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0)
        if self.config.embed_scale:  # Gemma: sqrt(hidden) rounded to the model dtype first
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, jnp.float32).astype(x.dtype)
        return x

    def _layers(self, x: jax.Array, kv_cache: KVCache, lora: LoraStacks | None,
                batch: TokenBatch) -> tuple[jax.Array, KVCache]:
        config, cache = self.config, (kv_cache.k, kv_cache.v)
        for i, layer in enumerate(self.layers):
            layer_lora = None if lora is None else lora.layer(i)
            x, cache = decoder_layer(config, x, cache, i, layer.weights(), layer_lora, batch)
        return x, KVCache(*cache, dtype=kv_cache.dtype)

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.norm[...], self.config.rms_norm_eps, self.config.norm_offset)

    def ragged(
        self,
        tokens: jax.Array,
        meta: RaggedMeta,
        kv_cache: KVCache,
        lora: LoraStacks | None = None,
        adapter_slot: jax.Array | None = None,
        rope_scale: jax.Array | None = None,
        seq_len: jax.Array | None = None,
        *,
        lora_backend: str | None = None,
        attention_backend: str | None = None,
        mesh=None,
        lora_sites: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """One ragged step over the paged pool (see models.ragged).

        tokens [T] int32 with meta (positions, request of each token, block tables, attention
        layouts); adapter_slot [R] int32 (-1 = base), rope_scale [R] float32, seq_len [R] int32
        (each request's last position in this step + 1, for dynamic NTK RoPE) -> (hidden
        [T, D] after the final norm, kv_cache with this step's keys and values written).
        mesh: the tensor-parallel mesh of a split model (its Pallas kernels run under
        shard_map, models.tp_kernels), else None. lora_sites [len(models.lora.SITES)] bool:
        the LoRA sites any of the step's adapters uses (the others skip their adapter work).
        """
        config = self.config
        req = jnp.minimum(meta.token_req, meta.tables.shape[0] - 1)
        real = meta.positions >= 0
        slot = None
        if lora is not None:
            if adapter_slot is None:
                raise ValueError("adapter_slot is required when lora stacks are given")
            slot = jnp.where(real, adapter_slot[req], -1).astype(jnp.int32)
        positions = jnp.maximum(meta.positions, 0)[:, None]
        cos, sin = rope_cos_sin(config, positions,
                                None if rope_scale is None else rope_scale[req],
                                None if seq_len is None else seq_len[req])
        local = _local_rope(config, positions, None if rope_scale is None else rope_scale[req])
        batch = TokenBatch(meta.positions[None], None, cos[:, 0][None], sin[:, 0][None], slot,
                           lora_backend, kv_dtype=kv_cache.dtype, ragged=meta,
                           attention_backend=attention_backend, mesh=mesh,
                           local_rope=None if local is None else (local[0][:, 0][None],
                                                                  local[1][:, 0][None]),
                           lora_sites=lora_sites)
        if lora is not None:
            batch = with_lora_meta(batch, lora.num_slots)
        x, cache = self._layers(self._embed(tokens)[None], kv_cache, lora, batch)
        return self._final_norm(x[0]), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (lm_head, or the embedding when tied)."""
        head = self.embed if self.lm_head is None else self.lm_head
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = matmul(rows, head[...]).reshape(*hidden.shape[:-1], head.shape[0])
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


def _local_rope(config: LlamaConfig, positions: jax.Array, rope_scale: jax.Array | None):
    """The sliding layers' (cos, sin) when they have a RoPE base of their own, else None."""
    if config.rope_local_theta is None or config.layer_windows is None:
        return None
    return rope_cos_sin(config, positions, rope_scale, local=True)


def forward(graphdef: nnx.GraphDef, state: nnx.State, *args, **kwargs) -> tuple[jax.Array, KVCache]:
    """Pure `Llama.__call__`: jax.jit(forward, static_argnums=0) compiles once per shape."""
    return nnx.merge(graphdef, state)(*args, **kwargs)
