"""Which (layer, projection) pairs a PEFT LoRA config covers, by PEFT's own matching rule, and
the check that an adapter file holds weights for exactly those pairs (check_tensors).

PEFT (tuners_utils.check_target_module_exists) matches each module of the wrapped
LlamaForCausalLM by its full name, e.g. "model.layers.3.self_attn.q_proj":
- exclude_modules first: a regex string is fullmatched; a list matches the name itself or a
  ".{entry}" suffix;
- target_modules as a regex string is fullmatched ("all-linear" means every linear layer but
  lm_head: the seven projections, or Phi-3's qkv_proj, o_proj, gate_up_proj, down_proj);
  as a list, an entry equal to the full name covers it outright, and an entry that is a
  ".{entry}" suffix covers it subject to layers_to_transform (an int or a list), whose
  layer index is read after layers_pattern (or, without one, from the first numbered
  segment of the name).
LoraConfig also refuses layers_to_transform / layers_pattern with a regex target_modules, and
layers_pattern without layers_to_transform; so do we.
"""

import re
from typing import Any

from models.config import FUSED, PROJECTIONS

PARENT = ({p: "self_attn" for p in PROJECTIONS[:4]} | {p: "mlp" for p in PROJECTIONS[4:]}
          | {"qkv_proj": "self_attn", "gate_up_proj": "mlp"})
# Every module name lora-jax serves LoRA on, in any family (Phi-3's fused ones included).
SERVED = (*PROJECTIONS, *FUSED)
ALL_LINEAR = "all-linear"
_WEIGHTS = "adapter_model.safetensors"
# Linear modules of a Llama that lora-jax does not serve LoRA on.
UNSERVED_MODULES = ("lm_head", "model.embed_tokens")


def module_name(layer: int, proj: str) -> str:
    """The full name PEFT matches for one projection of one layer."""
    return f"model.layers.{layer}.{PARENT[proj]}.{proj}"


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def _is_layer_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_coverage_config(config: dict[str, Any], name: str) -> None:
    """ValueError naming the adapter and the key for what PEFT's LoraConfig would refuse."""
    targets = config.get("target_modules")
    excluded = config.get("exclude_modules")
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    where = f"adapter {name!r}: adapter_config.json"
    if not (isinstance(targets, str) or _is_str_list(targets)):
        raise ValueError(f"{where}: target_modules must be a list of module names or a regex "
                         f"string, got {targets!r}")
    for key, value in (("target_modules", targets), ("exclude_modules", excluded)):
        if isinstance(value, str) and value.lower() != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{where}: {key} {value!r} is not a valid regex ({err})") from err
    if excluded is not None and not (isinstance(excluded, str) or _is_str_list(excluded)):
        raise ValueError(f"{where}: exclude_modules must be a list of module names or a regex "
                         f"string, got {excluded!r}")
    if layers is not None and not (_is_layer_list(layers) or (
            isinstance(layers, int) and not isinstance(layers, bool))):
        raise ValueError(f"{where}: layers_to_transform must be an int or a list of ints, "
                         f"got {layers!r}")
    if pattern is not None and not (isinstance(pattern, str) or _is_str_list(pattern)):
        raise ValueError(f"{where}: layers_pattern must be a string or a list of strings, "
                         f"got {pattern!r}")
    if isinstance(targets, str) and (layers is not None or pattern is not None):
        raise ValueError(f"{where}: layers_to_transform / layers_pattern cannot be used with a "
                         "regex string target_modules (PEFT refuses it too); put the layers "
                         "in the regex instead")
    if pattern and layers is None:
        raise ValueError(f"{where}: layers_pattern {pattern!r} needs layers_to_transform")


def _excluded(config: dict[str, Any], key: str) -> bool:
    excluded = config.get("exclude_modules")
    if not excluded:
        return False
    if isinstance(excluded, str):
        return re.fullmatch(excluded, key) is not None
    return key in excluded or any(key.endswith(f".{e}") for e in excluded)


def _layer_index(config: dict[str, Any], key: str) -> int | None:
    patterns = config.get("layers_pattern")
    if not patterns:
        # Lazy: the first numbered segment is the layer, as in PEFT.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def targets_module(config: dict[str, Any], key: str,
                   modules: tuple[str, ...] = PROJECTIONS) -> bool:
    """Whether PEFT puts a LoRA layer on the module with full name `key` of a model whose
    linear layers are `modules` (the family's PEFT names)."""
    if _excluded(config, key):
        return False
    targets = config["target_modules"]
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return key.rsplit(".", 1)[-1] in modules and key.startswith("model.layers.")
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (not isinstance(layers, int) and len(layers) == 0):
        return True
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def covered_pairs(config: dict[str, Any], num_layers: int,
                  modules: tuple[str, ...] = PROJECTIONS) -> set[tuple[int, str]]:
    """The (layer, module) pairs of a num_layers model with linear layers `modules` that the
    config puts LoRA on."""
    return {(layer, proj) for layer in range(num_layers) for proj in modules
            if targets_module(config, module_name(layer, proj), modules)}


def unserved_targets(config: dict[str, Any]) -> list[str]:
    """Modules outside the seven projections that the config targets (lm_head, embeddings)."""
    targets = config["target_modules"]
    if isinstance(targets, list):
        return [t for t in targets
                if t.rsplit(".", 1)[-1] not in SERVED and not _excluded(config, t)]
    return [m for m in UNSERVED_MODULES if targets_module(config, m)]


def check_tensors(present: dict[str, dict[int, dict]], config: dict[str, Any],
                  num_layers: int, name: str,
                  modules: tuple[str, ...] = PROJECTIONS) -> set[tuple[int, str]]:
    """Exactly the tensors the config asks for: A and B for every covered (layer, projection),
    nothing for any other -> the covered pairs. `present` is {projection: {layer: {"A"|"B":
    tensor}}} as read from the file; ValueError names the adapter, layer and projection."""
    covered = covered_pairs(config, num_layers, modules)
    for proj, per_layer in sorted(present.items()):
        for layer, pair in sorted(per_layer.items()):
            where = f"layers.{layer}.{PARENT[proj]}.{proj}"
            if layer >= num_layers:
                raise ValueError(f"adapter {name!r}: {where} is beyond the base model's "
                                 f"{num_layers} layers")
            if (layer, proj) not in covered:
                raise ValueError(
                    f"adapter {name!r}: {_WEIGHTS} has weights for layer {layer} {proj} "
                    f"({where}), which its adapter_config.json does not target ({_rule(config)}); "
                    "the config and the weights disagree")
            for side in "AB":
                if side not in pair:
                    raise ValueError(f"adapter {name!r}: {where} has lora_{'BA'[side == 'B']} "
                                     f"but no lora_{side}")
    for layer, proj in sorted(covered):
        if layer not in present.get(proj, {}):
            raise ValueError(
                f"adapter {name!r}: its adapter_config.json targets layer {layer} {proj} "
                f"({module_name(layer, proj)}; {_rule(config)}), but {_WEIGHTS} has no "
                "lora_A / lora_B for it")
    return covered


def _rule(config: dict[str, Any]) -> str:
    keys = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    return ", ".join(f"{k}={config[k]!r}" for k in keys if config.get(k) is not None)
