"""PEFT LoRA adapters: find them (local folder or Hub), validate them against the base model,
load them as per-projection numpy stacks with the scaling folded into B, and save them back."""

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora_jax.lora.coverage import (
    PARENT,
    SERVED,
    check_coverage_config,
    check_tensors,
    module_name,
    unserved_targets,
)
from models.config import FUSED, PROJECTIONS

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT key: [base_model.model.]model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.{adapter}].weight
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)"
    r"\.lora_([AB])(?:\.[^.]+)?\.weight$"
)


class BaseShapes(Protocol):
    """What adapter validation needs of the base model (models.LlamaConfig provides it)."""

    num_hidden_layers: int
    # Optional: the family's LoRA-targetable module names (default: Llama's seven).

    def projection_shapes(self) -> dict[str, tuple[int, int]]: ...


@dataclass(frozen=True)
class LoRAWeights:
    """One projection, all layers: a [L, D_in, r], b [L, r, D_out] float32, scaling folded in b."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return self.a.shape[-1]


class HostPacked(NamedTuple):
    """An adapter packed on the host for slots of max_rank and dtype (a dtype name):
    models.lora.pack_host's fields."""

    max_rank: int
    dtype: str
    fields: dict[str, np.ndarray]


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter: weights for each projection it touches (untouched ones are absent).

    `layers` says which layers of each projection the adapter covers (from a folder: by its
    adapter_config.json); the stacks hold zeros for the others, which adds exactly nothing.
    """

    name: str
    modules: dict[str, LoRAWeights]
    path: str = ""
    base_model_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The weights already in the device slots' layout (AdapterSlots.prepare, run by the loader
    # off the engine thread), or None.
    packed: HostPacked | None = field(default=None, compare=False, repr=False)

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def num_layers(self) -> int:
        return next(iter(self.modules.values())).a.shape[0]


def resolve_adapter_path(path: str, *, cache_dir: str | None = None) -> Path:
    """A local folder (with ~ expanded), else a Hub repo id fetched through huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise FileNotFoundError(f"adapter path {path!r} is a file; pass the folder that holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(
            repo_id=path, cache_dir=cache_dir,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"],
        ))
    except HFValidationError as err:
        raise FileNotFoundError(
            f"adapter path {path!r} is neither an existing local folder nor a valid Hub repo id"
        ) from err
    except Exception as err:  # the hub raises many kinds: offline, not found, gated, network
        raise FileNotFoundError(
            f"adapter {path!r} is not a local folder, and fetching it as a Hub repo id failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def read_adapter_config(folder: Path, name: str) -> dict[str, Any]:
    """Parse and validate adapter_config.json; ValueError names the adapter and the problem."""
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"adapter {name!r}: {file} is missing (not a PEFT adapter folder)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter {name!r}: {file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"adapter {name!r}: {file} must hold a JSON object")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"adapter {name!r}: {CONFIG_NAME} has no {key!r} key")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type {config['peft_type']!r} is not LORA")
    r = config["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"adapter {name!r}: r must be a positive int, got {r!r}")
    if config.get("use_dora"):
        raise ValueError(f"adapter {name!r}: DoRA (use_dora=true) is not supported; "
                         "merge it into the base model or retrain without DoRA")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {name!r}: bias={config['bias']!r} is not supported; "
                         "only bias='none' adapters can be served")
    if config.get("modules_to_save"):
        raise ValueError(f"adapter {name!r}: modules_to_save={config['modules_to_save']!r} "
                         "(full embedding/lm_head copies) is not supported")
    check_coverage_config(config, name)
    unserved = unserved_targets(config)
    if unserved:
        raise ValueError(f"adapter {name!r}: target module(s) {unserved} are not served; "
                         f"lora-jax serves {list(SERVED)}")
    return config


def _pattern_value(patterns: Mapping[str, Any], module_key: str, default: Any) -> Any:
    # PEFT matches each pattern key against the end of the module's full name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return value
    return default


def _scaling(config: dict[str, Any], module_key: str) -> tuple[int, float]:
    r = _pattern_value(config.get("rank_pattern") or {}, module_key, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module_key, config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _read_tensors(folder: Path, name: str) -> dict[str, np.ndarray]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"adapter {name!r}: only adapter_model.bin (a torch pickle) was "
                             "found; convert it with PeftModel.from_pretrained(...)"
                             ".save_pretrained(..., safe_serialization=True)")
        raise FileNotFoundError(f"adapter {name!r}: {file} is missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"adapter {name!r}: {file} is truncated or corrupt ({err})") from err


def load_adapter(
    path: str,
    *,
    name: str | None = None,
    base: BaseShapes | None = None,
    max_lora_rank: int | None = None,
    cache_dir: str | None = None,
) -> LoRAAdapter:
    """Load a PEFT adapter; validate it against `base` (layers, projection shapes) when given."""
    name = name or path
    folder = resolve_adapter_path(path, cache_dir=cache_dir)
    config = read_adapter_config(folder, name)
    tensors = _read_tensors(folder, name)
    layers = _group_by_module(tensors, name)
    if not layers:
        raise ValueError(f"adapter {name!r}: {WEIGHTS_NAME} holds no LoRA weights")
    num_layers = base.num_hidden_layers if base is not None else 1 + max(
        i for per_layer in layers.values() for i in per_layer)
    if base is not None:
        names = getattr(base, "peft_modules", PROJECTIONS)
    else:  # no base to ask: the file's own names tell the family
        names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj") if set(layers) & set(
            FUSED) else PROJECTIONS
    foreign = sorted(set(layers) - set(names))
    if foreign:
        raise ValueError(f"adapter {name!r} has LoRA weights for {foreign}, modules the base "
                         f"model does not have (its linear layers: {list(names)}); was it "
                         "trained for another model family?")
    covered = check_tensors(layers, config, num_layers, name, names)
    shapes = _module_shapes(base.projection_shapes()) if base is not None else {}
    modules = {
        proj: _stack_module(proj, per_layer, config, num_layers, shapes.get(proj), name)
        for proj, per_layer in layers.items()
    }
    adapter = LoRAAdapter(name=name, modules=_unfuse(modules, shapes), path=str(folder),
                          base_model_name=config.get("base_model_name_or_path"), config=config,
                          layers=_unfuse_layers(covered, modules))
    if max_lora_rank is not None and adapter.rank > max_lora_rank:
        raise ValueError(f"adapter {name!r} has rank {adapter.rank}, above max_lora_rank="
                         f"{max_lora_rank}; raise max_lora_rank or use a smaller adapter")
    return adapter


def _module_shapes(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Projection shapes plus the fused modules' (d_in, sum of their parts' d_out)."""
    fused = {f: (shapes[parts[0]][0], sum(shapes[p][1] for p in parts))
             for f, parts in FUSED.items()}
    return {**shapes, **fused}


def _unfuse(modules: dict[str, LoRAWeights],
            shapes: dict[str, tuple[int, int]]) -> dict[str, LoRAWeights]:
    """A fused module's weights (Phi-3's qkv_proj: B covers q|k|v) -> one entry per projection,
    each with the shared A and its own columns of B: the same product, in our packed form."""
    out = {}
    for proj, w in modules.items():
        if proj not in FUSED:
            out[proj] = w
            continue
        parts = FUSED[proj]
        if shapes:
            widths = [shapes[p][1] for p in parts]
        else:  # no base: gate|up halve; q|k|v cannot be split without head counts
            if proj == "qkv_proj":
                raise ValueError("a fused qkv_proj adapter needs the base model's shapes to "
                                 "split q|k|v; pass base=")
            widths = [w.b.shape[-1] // 2] * 2
        cuts = np.cumsum(widths[:-1]).tolist()
        for part, b in zip(parts, np.split(w.b, cuts, axis=-1), strict=True):
            out[part] = LoRAWeights(w.a, np.ascontiguousarray(b))
    return out


def _unfuse_layers(covered: set[tuple[int, str]],
                   modules: dict[str, LoRAWeights]) -> dict[str, tuple[int, ...]]:
    layers = {}
    for proj in modules:
        ids = tuple(sorted(i for i, q in covered if q == proj))
        for part in FUSED.get(proj, (proj,)):
            layers[part] = ids
    return layers


def _group_by_module(tensors: dict[str, np.ndarray], name: str) -> dict[str, dict[int, dict]]:
    layers: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(2) not in SERVED:
            raise ValueError(f"adapter {name!r}: tensor {key!r} targets a module lora-jax does "
                             f"not serve; only LoRA on {list(SERVED)} is supported")
        layer, proj, side = int(match.group(1)), match.group(2), match.group(3)
        value = value.astype(np.float32)  # bf16/fp16 adapters are served from float32 stacks
        if not np.all(np.isfinite(value)):
            raise ValueError(f"adapter {name!r}: tensor {key!r} holds NaN or infinite values")
        layers.setdefault(proj, {}).setdefault(layer, {})[side] = value
    return layers


def _stack_module(proj: str, per_layer: dict[int, dict[str, np.ndarray]], config: dict[str, Any],
                  num_layers: int, shape: tuple[int, int] | None, name: str) -> LoRAWeights:
    """Stack one projection's layers into a [L, D_in, r], b [L, r, D_out], scaled, zero-padded:
    layers the adapter does not cover stay zero, so their tokens get the base projection."""
    parts = {}
    for layer, pair in sorted(per_layer.items()):
        where = f"layers.{layer}.{PARENT[proj]}.{proj}"
        a, b = pair["A"], pair["B"]  # PEFT stores Linear weights: A [r, D_in], B [D_out, r]
        r, scale = _scaling(config, module_name(layer, proj))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"adapter {name!r}: {where} lora_A {a.shape} / lora_B {b.shape} "
                             f"do not have the configured rank {r}")
        if shape is not None and (a.shape[1], b.shape[0]) != shape:
            raise ValueError(f"adapter {name!r}: {where} maps {a.shape[1]} -> {b.shape[0]} "
                             f"features, but the base model's {proj} maps {shape[0]} -> "
                             f"{shape[1]}; was it trained for another model?")
        parts[layer] = (a.T, b.T * np.float32(scale))
    rank = max(a.shape[1] for a, _ in parts.values())
    d_in, d_out = next(iter(parts.values()))[0].shape[0], next(iter(parts.values()))[1].shape[1]
    stack_a = np.zeros((num_layers, d_in, rank), np.float32)
    stack_b = np.zeros((num_layers, rank, d_out), np.float32)
    for layer, (a, b) in parts.items():
        stack_a[layer, :, : a.shape[1]] = a
        stack_b[layer, : b.shape[0]] = b
    return LoRAWeights(stack_a, stack_b)


def save_adapter(
    adapter: LoRAAdapter,
    folder: str | Path,
    *,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    base: BaseShapes | None = None,
) -> Path:
    """Write `adapter` in the PEFT format (adapter_config.json + adapter_model.safetensors).

    The loaded B has its scaling folded in; with lora_alpha=None the config states alpha = r for
    every module so PEFT's scaling is 1. With lora_alpha given, B is divided by that scaling.
    base: a family with fused modules (Phi-3) gets its q/k/v (gate/up) written as one qkv_proj
    (gate_up_proj) module: A stacked over the parts, B block-diagonal, the same product.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = adapter.modules
    if base is not None and "qkv_proj" in getattr(base, "peft_modules", ()):
        modules = fuse_modules(modules, base.projection_shapes())
    rank = max(w.rank for w in modules.values())
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for proj, w in modules.items():
        alpha = w.rank if lora_alpha is None else lora_alpha
        scale = alpha / (math.sqrt(w.rank) if use_rslora else w.rank)
        if w.rank != rank:
            rank_pattern[proj] = w.rank
        if lora_alpha is None or w.rank != rank:
            alpha_pattern[proj] = alpha
        for layer in range(w.a.shape[0]):
            prefix = f"base_model.model.model.layers.{layer}.{PARENT[proj]}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(w.a[layer].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(w.b[layer].T / scale)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": rank if lora_alpha is None else lora_alpha,
        "target_modules": sorted(modules), "use_rslora": use_rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0,
        "bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path or adapter.base_model_name,
        "inference_mode": True, "init_lora_weights": True,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def fuse_modules(modules: dict[str, LoRAWeights],
                 shapes: dict[str, tuple[int, int]]) -> dict[str, LoRAWeights]:
    """Per-projection weights -> a fused module per FUSED group that has any of its parts.
    Parts that share one A (a fused PEFT module loaded, or trained with the fused name) give it
    back as it was: that A [L, D_in, r] and the parts' B side by side [L, r, sum D_out].
    Otherwise a = the parts' A side by side [L, D_in, sum r], b block-diagonal
    [L, sum r, sum D_out] (a part the adapter lacks adds no rank and zero columns)."""
    out = {p: w for p, w in modules.items() if not any(p in parts for parts in FUSED.values())}
    for fused, parts in FUSED.items():
        present = [p for p in parts if p in modules]
        if not present:
            continue
        if len(present) == len(parts) and all(
                np.array_equal(modules[p].a, modules[parts[0]].a) for p in parts):
            out[fused] = LoRAWeights(modules[parts[0]].a,
                                     np.concatenate([modules[p].b for p in parts], axis=-1))
            continue
        layers = modules[present[0]].a.shape[0]
        a = np.concatenate([modules[p].a for p in present], axis=-1)
        b = np.zeros((layers, a.shape[-1], sum(shapes[p][1] for p in parts)), np.float32)
        row = col = 0
        for p in parts:
            width = shapes[p][1]
            if p in modules:
                r = modules[p].rank
                b[:, row:row + r, col:col + width] = modules[p].b
                row += r
            col += width
        out[fused] = LoRAWeights(a, b)
    return out
