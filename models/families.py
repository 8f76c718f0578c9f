"""The model families lora-jax runs: each Hugging Face `model_type` mapped to the switches it
turns on in the one decoder (models.layers). A switch is static Python config, so a family with
every switch off (Llama) compiles to the program it always had.

Switches (LlamaConfig fields): attention_bias (q/k/v biases), qk_norm (an RMSNorm over each head
of q and k before RoPE), norm_offset (RMSNorm scales by 1 + w), hidden_act, embed_scale
(embeddings times sqrt(hidden)), sandwich_norms (a norm after attention and after the MLP as
well), query_pre_attn_scalar, attn_logit_softcapping / final_logit_softcapping, layer_windows
(a sliding window per layer), rope_local_theta (the RoPE base of sliding layers) and
fused_projections (Phi-3's qkv_proj / gate_up_proj tensors and PEFT module names).
"""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """What a model_type adds to Llama; `act_key` names its config.json activation field."""

    architectures: tuple[str, ...]
    qkv_bias: bool = False  # q/k/v biases always present (Qwen2), not read from the config
    qk_norm: bool = False
    gemma: bool = False  # norm offset, embedding scale, four norms per layer, GeGLU default
    fused_projections: bool = False
    act_key: str = "hidden_act"
    # How config.json places sliding windows when it has no `layer_types` list.
    window_rule: str = "all"  # all | max_window_layers | alternate | pattern


FAMILIES = {
    "llama": Family(("LlamaForCausalLM", "LlamaModel")),
    "mistral": Family(("MistralForCausalLM", "MistralModel")),
    "qwen2": Family(("Qwen2ForCausalLM", "Qwen2Model"), qkv_bias=True,
                    window_rule="max_window_layers"),
    "qwen3": Family(("Qwen3ForCausalLM", "Qwen3Model"), qk_norm=True,
                    window_rule="max_window_layers"),
    "gemma2": Family(("Gemma2ForCausalLM", "Gemma2Model"), gemma=True,
                     act_key="hidden_activation", window_rule="alternate"),
    "gemma3_text": Family(("Gemma3ForCausalLM", "Gemma3TextModel"), qk_norm=True, gemma=True,
                          act_key="hidden_activation", window_rule="pattern"),
    "phi3": Family(("Phi3ForCausalLM", "Phi3Model"), fused_projections=True),
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def family_of(d: dict[str, Any]) -> Family:
    """The Family of a config.json dict; one-line ValueError for anything else."""
    model_type = d.get("model_type", "llama")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not supported; lora-jax runs "
                         f"{', '.join(FAMILIES)} (dense text models: no MoE, no vision)")
    wrong = [a for a in d.get("architectures") or () if a not in family.architectures]
    if wrong:
        raise ValueError(f"architecture {wrong[0]!r} is not supported for model_type "
                         f"{model_type!r} (supported: {', '.join(family.architectures)})")
    return family


def family_fields(d: dict[str, Any], family: Family) -> dict[str, Any]:
    """The LlamaConfig switch fields that config.json `d` of `family` sets."""
    act = d.get(family.act_key) or d.get("hidden_act") or (
        "gelu_pytorch_tanh" if family.gemma else "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"config field {family.act_key!r}={act!r} is not supported "
                         f"(supported: {', '.join(ACTIVATIONS)})")
    if d.get("use_bidirectional_attention"):
        raise ValueError("config field 'use_bidirectional_attention'=True is not supported "
                         "(an encoder, not a causal LM)")
    if d.get("mlp_bias"):
        raise ValueError("config field 'mlp_bias'=True is not supported")
    if d.get("attention_bias") and not family.qkv_bias:
        raise ValueError(f"config field 'attention_bias'=True is not supported for "
                         f"model_type {d.get('model_type', 'llama')!r} (it biases o_proj too)")
    fields = dict(model_type=d.get("model_type", "llama"), hidden_act=act,
                  attention_bias=family.qkv_bias, qk_norm=family.qk_norm,
                  fused_projections=family.fused_projections,
                  layer_windows=layer_windows(d, family))
    if family.gemma:
        fields.update(norm_offset=True, embed_scale=True, sandwich_norms=True,
                      query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
                      final_logit_softcapping=d.get("final_logit_softcapping"),
                      attn_logit_softcapping=(d.get("attn_logit_softcapping")
                                              if d.get("model_type") == "gemma2" else None))
    return fields


def layer_windows(d: dict[str, Any], family: Family) -> tuple[int | None, ...] | None:
    """Each layer's sliding window (keys within `window` positions of the query, itself
    included), None for full attention; None overall when no layer slides."""
    n, window = d.get("num_hidden_layers"), d.get("sliding_window")
    if family.window_rule == "max_window_layers" and not d.get("use_sliding_window"):
        window = None
    if window is None or not isinstance(n, int):
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"config field 'sliding_window' must be a positive integer or null, "
                         f"got {window!r}")
    types = d.get("layer_types")
    if types is not None:
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"config field 'layer_types' must list {n} entries of "
                             f"'sliding_attention' / 'full_attention', got {types!r}")
        sliding = [t == "sliding_attention" for t in types]
    elif family.window_rule == "max_window_layers":
        sliding = [i >= d.get("max_window_layers", 28) for i in range(n)]
    elif family.window_rule == "alternate":
        sliding = [bool((i + 1) % 2) for i in range(n)]
    elif family.window_rule == "pattern":
        pattern = d.get("sliding_window_pattern", 6)
        sliding = [bool((i + 1) % pattern) for i in range(n)]
    else:
        sliding = [True] * n
    windows = tuple(window if s else None for s in sliding)
    return windows if any(w is not None for w in windows) else None


def layer_sources(config) -> dict[str, tuple[str, ...]]:
    """Parameter of a DecoderLayer -> the HF tensors of that layer (names after
    "model.layers.{i}.") concatenated along d_out, for this config's family."""
    attn = (("self_attn.qkv_proj",) if config.fused_projections else
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    sources = {
        "attn_norm": ("input_layernorm.weight",),
        "qkv": tuple(f"{n}.weight" for n in attn),
        "o": ("self_attn.o_proj.weight",),
        "mlp_norm": ("pre_feedforward_layernorm.weight" if config.sandwich_norms
                     else "post_attention_layernorm.weight",),
        "gate_up": (("mlp.gate_up_proj.weight",) if config.fused_projections else
                    ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
        "down": ("mlp.down_proj.weight",),
    }
    if config.attention_bias:
        sources["qkv_bias"] = tuple(f"{n}.bias" for n in attn)
    if config.qk_norm:
        sources["q_norm"] = ("self_attn.q_norm.weight",)
        sources["k_norm"] = ("self_attn.k_norm.weight",)
    if config.sandwich_norms:
        sources["post_attn_norm"] = ("post_attention_layernorm.weight",)
        sources["post_mlp_norm"] = ("post_feedforward_layernorm.weight",)
    return sources
