"""Rotary position embeddings: the default, linear, dynamic-NTK, llama3 and longrope (Phi-3)
frequency schedules, and a second base for sliding layers (Gemma 3's rope_local_base_freq).

Frequencies are computed the way transformers computes them (float32 throughout), so that
positions far out still agree with the reference to float32 rounding.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1's schedule: keep high frequencies, divide low ones by factor, blend between."""
    factor = np.float32(scaling["factor"])
    low, high = np.float32(scaling["low_freq_factor"]), np.float32(scaling["high_freq_factor"])
    old_context = np.float32(scaling["original_max_position_embeddings"])
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(config: LlamaConfig, local: bool = False) -> np.ndarray:
    """[head_dim // 2] float32 inverse frequencies for rope types that do not depend on length;
    local: the sliding layers' plain schedule at rope_local_theta."""
    if local:
        return _default_inv_freq(config.rope_local_theta, config.head_dim)
    inv_freq = _default_inv_freq(config.rope_theta, config.head_dim)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_scaling["factor"])).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, config.rope_scaling)
    return inv_freq


def _dynamic_inv_freq(config: LlamaConfig, positions: jax.Array,
                      seq_len: jax.Array | None = None) -> jax.Array:
    """[B, head_dim // 2]: NTK-scaled frequencies from each row's length in this call.

    transformers rescales from the largest position it is given, so a whole-prompt prefill
    followed by one-token decode steps matches it exactly; other chunkings follow their chunks.
    """
    dim, original = config.head_dim, config.max_position_embeddings
    factor = jnp.float32(config.rope_scaling["factor"])
    if seq_len is None:
        seq_len = jnp.max(positions, axis=-1) + 1
    seq_len = jnp.maximum(seq_len, original).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base[:, None] ** exponent[None, :])


def _longrope_inv_freq(config: LlamaConfig, positions: jax.Array,
                       seq_len: jax.Array | None = None) -> jax.Array:
    """[B, head_dim // 2]: LongRoPE's short factors while a row's length stays within
    original_max_position_embeddings, its long factors past it (as transformers switches)."""
    scaling = config.rope_scaling
    if seq_len is None:
        seq_len = jnp.max(positions, axis=-1) + 1
    exponent = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    base = np.float32(config.rope_theta) ** exponent
    short, long = (jnp.asarray((np.float32(1.0) / (np.asarray(scaling[k], np.float32) * base))
                               .astype(np.float32)) for k in ("short_factor", "long_factor"))
    use_long = seq_len > scaling["original_max_position_embeddings"]
    return jnp.where(use_long[:, None], long[None], short[None])


def rope_cos_sin(
    config: LlamaConfig, positions: jax.Array, rope_scale: jax.Array | None,
    seq_len: jax.Array | None = None, local: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """positions [B, L] int32, rope_scale [B] float32 or None -> cos, sin [B, L, head_dim] f32.
    seq_len [B]: the length dynamic NTK and longrope scale from (default: each row's last
    position + 1). local: the sliding layers' schedule (config.rope_local_theta)."""
    batch = positions.shape[0]
    if local:
        inv_freq = jnp.broadcast_to(jnp.asarray(static_inv_freq(config, local=True)),
                                    (batch, config.head_dim // 2))
    elif config.rope_type == "dynamic":
        inv_freq = _dynamic_inv_freq(config, positions, seq_len)
    elif config.rope_type == "longrope":
        inv_freq = _longrope_inv_freq(config, positions, seq_len)
    else:
        inv_freq = jnp.broadcast_to(jnp.asarray(static_inv_freq(config)),
                                    (batch, config.head_dim // 2))
    if rope_scale is not None:
        # Long-context LoRA: dividing the frequency equals dividing the position.
        inv_freq = inv_freq / rope_scale.astype(jnp.float32)[:, None]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[:, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    if config.rope_type == "longrope" and not local:
        factor = jnp.float32(config.rope_scaling["attention_factor"])
        return jnp.cos(angles) * factor, jnp.sin(angles) * factor
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, L, H, head_dim], cos/sin [B, L, head_dim] -> rotated x in x's dtype (half-split)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin
