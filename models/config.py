"""LlamaConfig: the Hugging Face `config.json` of a Llama or a relative (models.families),
validated once at the edge."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.families import family_fields, family_of

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
# Phi-3's fused modules: the PEFT/HF name -> the projections it packs, in our packed order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class LlamaConfig:
    """The shape and numerics of a Llama; field names follow Hugging Face's LlamaConfig.

    rope_scaling is None or a dict with "rope_type" in ROPE_TYPES (minus "default") and its
    parameters; eos_token_id is an int, a tuple of ints, or None.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str = "float32"
    # Tensor parallelism (models.sharding): the packed q|k|v and gate|up columns are stored
    # shard-major for this many shards. 1 = the checkpoint's own layout.
    packed_shards: int = 1
    # Family switches (models.families); the defaults are Llama's.
    model_type: str = "llama"
    hidden_act: str = "silu"
    attention_bias: bool = False
    qk_norm: bool = False
    norm_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_windows: tuple[int | None, ...] | None = None
    rope_local_theta: float | None = None
    fused_projections: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive number, got {value!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(self.rope_scaling[key]) != self.head_dim // 2:
                    raise ValueError(f"config field 'rope_scaling.{key}' must have head_dim / 2 "
                                     f"({self.head_dim // 2}) entries, got "
                                     f"{len(self.rope_scaling[key])}")
        if self.layer_windows is not None and len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"config field 'layer_windows' must have num_hidden_layers "
                             f"({self.num_hidden_layers}) entries, got {self.layer_windows!r}")

    def __hash__(self):
        # The config rides in the model's graphdef, which jit hashes; the dict needs a stable key.
        scaling = (tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                for k, v in self.rope_scaling.items()))
                   if self.rope_scaling else None)
        fields = [getattr(self, f) for f in self.__dataclass_fields__ if f != "rope_scaling"]
        return hash((*fields, scaling))

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by: head_dim^-0.5, or query_pre_attn_scalar^-0.5 (Gemma)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window (a query sees keys at q - window < k <= q), or None."""
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def peft_modules(self) -> tuple[str, ...]:
        """The LoRA-targetable module names of this family, as PEFT names them."""
        if self.fused_projections:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return PROJECTIONS

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each of the seven LoRA-targetable projections."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a config.json dict; ValueError names the bad, missing or unsupported field."""
        switches = family_fields(d, family_of(d))
        required = ("hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "vocab_size")
        missing = [name for name in required if d.get(name) is None]
        if missing:
            raise ValueError(f"config is missing required field(s) {missing}")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim")
        if head_dim is None:
            if not isinstance(heads, int) or heads <= 0 or d["hidden_size"] % heads:
                raise ValueError(f"config field 'num_attention_heads' ({heads!r}) must divide "
                                 f"hidden_size ({d['hidden_size']!r}) when head_dim is absent")
            head_dim = d["hidden_size"] // heads
        rope_theta, rope_scaling, local_theta = _rope_from_dict(d)
        eos = d.get("eos_token_id")
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            torch_dtype=d.get("torch_dtype") or d.get("dtype") or "float32",
            rope_local_theta=local_theta,
            **switches,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LlamaConfig":
        """Read `<folder>/config.json`."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {str(folder)!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _rope_from_dict(d: dict[str, Any]) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, the sliding layers' own theta or None) from either the
    transformers 4 or the transformers 5 keys (Gemma 3: one dict per layer type)."""
    params = d.get("rope_parameters")
    local = d.get("rope_local_base_freq")
    if params and "full_attention" in params:  # transformers >= 5, per layer type
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ValueError("config field 'rope_parameters.sliding_attention' must use the "
                             f"default rope type, got {sliding.get('rope_type')!r}")
        local = sliding.get("rope_theta", local)
        params = params["full_attention"]
    if params:  # transformers >= 5 puts theta and scaling into one dict
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:
        scaling, theta = d.get("rope_scaling"), d.get("rope_theta", 10000.0)
    if d.get("model_type") == "gemma3_text" and local is None:
        local = 10000.0  # transformers' default rope_local_base_freq
    scaling = dict(scaling or {})
    if scaling.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config field 'partial_rotary_factor' must be 1.0 (RoPE on part of "
                         "each head is not supported)")
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if rope_type in (None, "default"):
        return theta, None, local
    if rope_type == "longrope" or (rope_type in ("su", "yarn") and d.get("model_type") == "phi3"):
        return theta, _longrope(d, scaling), local
    return theta, {"rope_type": rope_type, **scaling}, local


def _longrope(d: dict[str, Any], scaling: dict) -> dict:
    """Phi-3's LongRoPE parameters with transformers' defaults filled in."""
    original = scaling.get("original_max_position_embeddings",
                           d.get("original_max_position_embeddings"))
    longest = d.get("max_position_embeddings", 2048)
    if not isinstance(original, int) or original <= 0:
        raise ValueError("config field 'original_max_position_embeddings' must be a positive "
                         f"integer for longrope, got {original!r}")
    factor = scaling.get("factor") or longest / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    out = {"rope_type": "longrope", "original_max_position_embeddings": original,
           "attention_factor": float(attention), "factor": float(factor)}
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        if not isinstance(value, list | tuple) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ValueError(f"config field 'rope_scaling.{key}' must be a list of numbers "
                             f"for longrope, got {value!r}")
        out[key] = tuple(float(v) for v in value)
    return out


def _check_rope_scaling(scaling: dict) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES[1:])})")
    keys = {"llama3": _LLAMA3_KEYS, "longrope": ("factor", "attention_factor",
                                                  "original_max_position_embeddings")}.get(
        rope_type, ("factor",))
    for key in keys:
        value = scaling.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"config field 'rope_scaling.{key}' must be a positive number for "
                             f"rope type {rope_type!r}, got {value!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("config field 'rope_scaling.high_freq_factor' must exceed low_freq_factor")
