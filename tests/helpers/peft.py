"""Write tiny PEFT adapters exactly as Hugging Face PEFT saves them (key names, config keys)."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class TinyShapes:
    """Stand-in for a base model config: 2 layers, hidden 16, 4 heads of 4, 2 kv heads, mlp 24."""

    num_hidden_layers: int = 2
    hidden_size: int = 16
    kv_size: int = 8
    intermediate_size: int = 24

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        h, kv, m = self.hidden_size, self.kv_size, self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


def peft_config(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), **extra) -> dict:
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": lora_alpha,
        "target_modules": list(target_modules) if not isinstance(target_modules, str)
        else target_modules,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": "tiny-llama", "inference_mode": True,
    }
    config.update(extra)
    return config


def random_lora_tensors(shapes=TinyShapes(), modules=("q_proj", "v_proj"), ranks=None, r=4,
                        seed=0, adapter_name=None, dtype=np.float32) -> dict[str, np.ndarray]:
    """PEFT-named tensors: lora_A [r, D_in], lora_B [D_out, r], random and non-zero."""
    rng = np.random.default_rng(seed)
    infix = f".{adapter_name}" if adapter_name else ""
    tensors = {}
    for layer in range(shapes.num_hidden_layers):
        for proj in modules:
            d_in, d_out = shapes.projection_shapes()[proj]
            rank = (ranks or {}).get(proj, r)
            prefix = f"base_model.model.model.layers.{layer}.{PARENT[proj]}.{proj}"
            tensors[f"{prefix}.lora_A{infix}.weight"] = rng.normal(size=(rank, d_in)).astype(dtype)
            tensors[f"{prefix}.lora_B{infix}.weight"] = rng.normal(size=(d_out, rank)).astype(dtype)
    return tensors


def write_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def make_adapter(folder: Path, *, shapes=TinyShapes(), r=4, lora_alpha=8,
                 modules=("q_proj", "v_proj"), seed=0, **config_extra) -> Path:
    """A complete random adapter folder for `shapes`."""
    config = peft_config(r=r, lora_alpha=lora_alpha, target_modules=modules, **config_extra)
    return write_adapter(folder, config, random_lora_tensors(shapes, modules, r=r, seed=seed))


def lora_tensors_for(pairs, shapes=TinyShapes(), r=4, seed=0) -> dict[str, np.ndarray]:
    """PEFT-named tensors for exactly the given (layer, projection) pairs, random, non-zero:
    what PEFT saves for an adapter that covers only those pairs."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, proj in sorted(pairs):
        d_in, d_out = shapes.projection_shapes()[proj]
        prefix = f"base_model.model.model.layers.{layer}.{PARENT[proj]}.{proj}"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(size=(r, d_in)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(size=(d_out, r)).astype(np.float32)
    return tensors


def make_partial_adapter(folder: Path, pairs, *, shapes=TinyShapes(), r=4, lora_alpha=8,
                         target_modules=("q_proj", "v_proj"), seed=0, **config_extra) -> Path:
    """An adapter folder in PEFT's layout whose config (target_modules as a list or a regex,
    layers_to_transform, layers_pattern, exclude_modules ... in config_extra) covers only some
    layers; `pairs` are the (layer, projection) pairs the caller states that config covers, and
    get weights. PEFT writes layers_to_transform as given (int or list)."""
    config = peft_config(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                         **config_extra)
    return write_adapter(folder, config, lora_tensors_for(pairs, shapes, r=r, seed=seed))
