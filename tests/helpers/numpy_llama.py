"""An independent float64 NumPy Llama with transformers' semantics, read from HF-named tensors
(unpacked projections, [d_out, d_in]): the reference the JAX model and engine are tested on."""

import math

import numpy as np

from models import LlamaConfig


def _inv_freq(config: LlamaConfig, seq_len: int) -> np.ndarray:
    d, scaling = config.head_dim, config.rope_scaling or {}
    theta = config.rope_theta
    if config.rope_type == "dynamic" and seq_len > config.max_position_embeddings:
        f = scaling["factor"]
        theta *= (f * seq_len / config.max_position_embeddings - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    if config.rope_type == "linear":
        inv = inv / scaling["factor"]
    if config.rope_type == "llama3":
        f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        inv = np.where(wavelen < old / hi, inv,
                       np.where(wavelen > old / lo, inv / f, (1 - smooth) * inv / f + smooth * inv))
    return inv


def reference_logits(tensors, config: LlamaConfig, ids, lora=None, rope_scale=1.0):
    """One sequence, whole-prompt forward in float64: ids [L] -> logits [L, V]."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    h, kv, d, eps = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                     config.rms_norm_eps)
    length = len(ids)
    angles = np.arange(length)[:, None] / rope_scale * _inv_freq(config, length)[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(x):  # [L, heads, d]
        rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos[:, None] + rotated * sin[:, None]

    def norm(x, w):
        return t[w] * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)

    def linear(x, i, group, name):
        y = x @ t[f"model.layers.{i}.{group}.{name}.weight"].T
        if lora and name in lora:
            y = y + x @ lora[name].a[i].astype(np.float64) @ lora[name].b[i].astype(np.float64)
        return y

    x = t["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((length, length), bool))
    for i in range(config.num_hidden_layers):
        a = norm(x, f"model.layers.{i}.input_layernorm.weight")
        q = rope(linear(a, i, "self_attn", "q_proj").reshape(length, h, d))
        k = rope(linear(a, i, "self_attn", "k_proj").reshape(length, kv, d))
        v = linear(a, i, "self_attn", "v_proj").reshape(length, kv, d)
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(length, h * d)
        x = x + linear(attn, i, "self_attn", "o_proj")
        m = norm(x, f"model.layers.{i}.post_attention_layernorm.weight")
        gate, up = linear(m, i, "mlp", "gate_proj"), linear(m, i, "mlp", "up_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * up, i, "mlp", "down_proj")
    x = norm(x, "model.norm.weight")
    head = t["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return x @ head.T
