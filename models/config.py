"""LlamaConfig: the Hugging Face `config.json` of a Llama, validated once at the edge."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

_ARCHITECTURES = ("LlamaForCausalLM", "LlamaModel")
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

    def __hash__(self):
        # The config rides in the model's graphdef, which jit hashes; the dict needs a stable key.
        scaling = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        fields = [getattr(self, f) for f in self.__dataclass_fields__ if f != "rope_scaling"]
        return hash((*fields, scaling))

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each of the seven LoRA-targetable projections."""
        d, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        """Build from a config.json dict; ValueError names the bad, missing or unsupported field."""
        _check_architecture(d)
        for name in ("hidden_act", "mlp_bias", "attention_bias"):
            if name in d and d[name] not in ({"silu"} if name == "hidden_act" else {False}):
                raise ValueError(f"config field {name!r}={d[name]!r} is not supported")
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
        rope_theta, rope_scaling = _rope_from_dict(d)
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
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LlamaConfig":
        """Read `<folder>/config.json`."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {str(folder)!r}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _check_architecture(d: dict[str, Any]) -> None:
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r} is not supported (only 'llama')")
    unsupported = [a for a in d.get("architectures") or () if a not in _ARCHITECTURES]
    if unsupported:
        raise ValueError(f"architecture {unsupported[0]!r} is not supported "
                         f"(supported: {', '.join(_ARCHITECTURES)})")


def _rope_from_dict(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the transformers 4 or the transformers 5 keys."""
    params = d.get("rope_parameters")
    if params:  # transformers >= 5 puts theta and scaling into one dict
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:
        scaling, theta = d.get("rope_scaling"), d.get("rope_theta", 10000.0)
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if rope_type in (None, "default"):
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}


def _check_rope_scaling(scaling: dict) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES[1:])})")
    keys = _LLAMA3_KEYS if rope_type == "llama3" else ("factor",)
    for key in keys:
        value = scaling.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"config field 'rope_scaling.{key}' must be a positive number for "
                             f"rope type {rope_type!r}, got {value!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("config field 'rope_scaling.high_freq_factor' must exceed low_freq_factor")
