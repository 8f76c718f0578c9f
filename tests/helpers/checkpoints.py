"""Tiny random Hugging Face Llama checkpoints and LoRA weights for tests.

write_checkpoint lays a folder out the way `save_pretrained` does: config.json plus
model.safetensors, or model-0000i-of-0000n.safetensors shards with model.safetensors.index.json.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from models.config import PROJECTIONS, LlamaConfig
from models.loading import expected_tensors


def tiny_config(**overrides) -> dict:
    """A config.json dict for a 2-layer GQA Llama small enough to compile in seconds."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


def random_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights ([d_out, d_in] for linear layers), scaled so every part matters."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_tensors(LlamaConfig.from_dict(config)).items():
        if len(shape) == 1:  # norm weights: near 1, but not 1, so a skipped norm shows
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return tensors


def write_checkpoint(folder: Path, config: dict | None = None, *, seed: int = 0,
                     shards: int = 1, dtype: str = "float32",
                     tensors: dict[str, np.ndarray] | None = None) -> Path:
    """Write config.json and random (or given) weights into folder; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_config(), torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = random_tensors(config, seed) if tensors is None else tensors
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {name: np.ascontiguousarray(t.astype(np_dtype)) for name, t in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in part}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in part})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


@dataclass(frozen=True)
class LoraModule:
    """Stand-in for lora_jax.adapters.LoRAWeights: a [L, d_in, r], b [L, r, d_out]."""

    a: np.ndarray
    b: np.ndarray


def random_lora(config: LlamaConfig, targets=PROJECTIONS, rank: int = 4, seed: int = 0,
                scale: float = 0.5) -> dict[str, LoraModule]:
    """Random adapter weights for the target projections, large enough to move the logits."""
    rng = np.random.default_rng(seed)
    shapes, layers = config.projection_shapes(), config.num_hidden_layers
    modules = {}
    for name in targets:
        d_in, d_out = shapes[name]
        a = rng.standard_normal((layers, d_in, rank)) / np.sqrt(d_in)
        b = scale * rng.standard_normal((layers, rank, d_out)) / np.sqrt(rank)
        modules[name] = LoraModule(a.astype(np.float32), b.astype(np.float32))
    return modules


def by_field(stacks, name: str) -> np.ndarray:
    """One LayerLora field of every layer of LoraStacks, stacked: [layers, ...] on the host."""
    return np.stack([np.asarray(getattr(layer, name)) for layer in stacks.layers])
