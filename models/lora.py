"""LoRA stacks: every adapter slot's weights for every layer, laid out for the packed projections.

The model runs q|k|v as one matmul and gate|up as another, so their adapters are packed the
same way: one shrink matrix whose columns are [A_q | A_k | A_v] (each max_rank wide) and one
expand matrix per output slice. A projection an adapter leaves alone has zero A and zero B in
its columns, which adds exactly zero: a q,v-only adapter gives the same k as the base model.
Ranks below max_rank are zero-padded, which is exact for the same reason.

Every stack has the slot axis first: shrink stacks [slots, d_in, n*R], expand stacks
[slots, R, d_out]. A slot is then one contiguous block, so filling it writes only that block
(XLA:CPU copies a whole stack to update a slice along any other axis, which made a fill's cost
grow with the number of slots) and the kernels gather a step's adapters as whole blocks.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import PROJECTIONS, LlamaConfig

# Packed shrink matrix -> the projections whose A columns it holds, in column order.
PACKED = {"qkv_a": ("q_proj", "k_proj", "v_proj"), "o_a": ("o_proj",),
          "gate_up_a": ("gate_proj", "up_proj"), "down_a": ("down_proj",)}
# The LoRA sites of a layer, one per packed shrink (see models.layers.project's `site`).
SITES = tuple(PACKED)


def sites_of(modules) -> np.ndarray:
    """The projections an adapter targets -> [len(SITES)] bool: the sites it uses."""
    return np.array([any(p in modules for p in PACKED[site]) for site in SITES])


EXPAND = {"q_proj": "q_b", "k_proj": "k_b", "v_proj": "v_b", "o_proj": "o_b",
          "gate_proj": "gate_b", "up_proj": "up_b", "down_proj": "down_b"}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerLora:
    """One layer's adapter weights, scaling folded into the B matrices; R = max_rank.

    In the stacks the shrink matrices a are [slots, d_in, n*R] (n projections in the group)
    and the expand matrices b [slots, R, d_out]; a single packed adapter (from pack_adapter)
    has no slot axis: a [d_in, n*R], b [R, d_out].
    """

    qkv_a: jax.Array
    q_b: jax.Array
    k_b: jax.Array
    v_b: jax.Array
    o_a: jax.Array
    o_b: jax.Array
    gate_up_a: jax.Array
    gate_b: jax.Array
    up_b: jax.Array
    down_a: jax.Array
    down_b: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoraStacks:
    """Every layer's LayerLora, one array per layer and field.

    Not one [layers, ...] array per field: XLA:CPU copies a slice of a stacked array before a
    matmul reads it, and those copies cost more than the adapters' own matmuls.
    """

    layers: tuple[LayerLora, ...]

    @property
    def num_slots(self) -> int:
        return self.layers[0].o_b.shape[0]

    @property
    def max_rank(self) -> int:
        return self.layers[0].o_a.shape[-1]

    def layer(self, i: int) -> LayerLora:
        return self.layers[i]


# Logical axes of every field (see models.sharding): column-parallel projections keep A whole
# and split B's output like their base weight; row-parallel ones (o, down) split A's input.
LORA_AXES = {
    "qkv_a": ("slots", "embed", "rank"), "q_b": ("slots", "rank", "heads"),
    "k_b": ("slots", "rank", "kv_heads"), "v_b": ("slots", "rank", "kv_heads"),
    "o_a": ("slots", "heads", "rank"), "o_b": ("slots", "rank", "embed"),
    "gate_up_a": ("slots", "embed", "rank"), "gate_b": ("slots", "rank", "mlp"),
    "up_b": ("slots", "rank", "mlp"), "down_a": ("slots", "mlp", "rank"),
    "down_b": ("slots", "rank", "embed"),
}

# Where each field's slot axis is (the first, for all of them).
SLOT_AXIS = {**{a: 0 for a in PACKED}, **{b: 0 for b in EXPAND.values()}}


def _shapes(config: LlamaConfig, max_rank: int) -> dict[str, tuple[int, int]]:
    """Per-slot shape of every LayerLora field (the stacks insert the slot axis at SLOT_AXIS)."""
    proj = config.projection_shapes()
    shapes = {a: (proj[group[0]][0], len(group) * max_rank) for a, group in PACKED.items()}
    shapes.update({EXPAND[p]: (max_rank, proj[p][1]) for p in PROJECTIONS})
    return shapes


def _check_rank(max_rank: Any) -> None:
    if not isinstance(max_rank, int) or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def init_lora_stacks(config: LlamaConfig, num_slots: int, max_rank: int,
                     dtype="float32") -> LoraStacks:
    """Zeros: per layer, each field its per-slot shape with num_slots inserted (see LayerLora)."""
    _check_rank(max_rank)
    if not isinstance(num_slots, int) or num_slots <= 0:
        raise ValueError(f"num_slots must be a positive integer, got {num_slots!r}")
    shapes = {name: shape[:SLOT_AXIS[name]] + (num_slots,) + shape[SLOT_AXIS[name]:]
              for name, shape in _shapes(config, max_rank).items()}
    return LoraStacks(tuple(
        LayerLora(**{name: jnp.zeros(shape, dtype) for name, shape in shapes.items()})
        for _ in range(config.num_hidden_layers)))


def pack_host(config: LlamaConfig, modules: Mapping[str, Any], max_rank: int,
              dtype="float32") -> dict[str, np.ndarray]:
    """One adapter in the slots' layout, on the host: modules[proj].a [L, d_in, r], .b
    [L, r, d_out] -> {field: [L, ...] array in dtype} for the fields the adapter writes (its
    projections' B and their groups' packed A; absent fields are zeros: see place_packed).

    r <= max_rank is zero-padded; pure numpy, so any thread can pack (the adapter loader does).
    """
    _check_rank(max_rank)
    unknown = sorted(set(modules) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"adapter targets unsupported module(s) {unknown}; "
                         f"supported: {', '.join(PROJECTIONS)}")
    layers, proj, shapes = config.num_hidden_layers, config.projection_shapes(), _shapes(
        config, max_rank)
    host: dict[str, np.ndarray] = {}
    for name, weights in modules.items():
        a, b = np.asarray(weights.a), np.asarray(weights.b)
        rank = a.shape[-1] if a.ndim == 3 else -1
        d_in, d_out = proj[name]
        if a.shape != (layers, d_in, rank) or b.shape != (layers, rank, d_out):
            raise ValueError(
                f"adapter module {name!r} has a {list(a.shape)} and b {list(b.shape)}; expected "
                f"a [{layers}, {d_in}, r] and b [{layers}, r, {d_out}] for this base model")
        if rank > max_rank:
            raise ValueError(f"adapter module {name!r} has rank {rank} above max_rank {max_rank}")
        a_field = next(f for f, group in PACKED.items() if name in group)
        for field in (a_field, EXPAND[name]):
            if field not in host:
                host[field] = np.zeros((layers, *shapes[field]), jnp.dtype(dtype))
        start = PACKED[a_field].index(name) * max_rank
        host[a_field][:, :, start:start + rank] = a
        host[EXPAND[name]][:, :rank, :] = b
    return host


def place_packed(host: Mapping[str, np.ndarray], zeros: LoraStacks) -> LoraStacks:
    """pack_host's fields placed on the device in one transfer; every other field is zeros'
    (an all-zero packed adapter from zero_packed: shared by every fill when it is on the
    device, placed with the rest when it is on the host)."""
    first = zeros.layers[0]
    names = [f.name for f in fields(LayerLora)
             if f.name in host or isinstance(getattr(first, f.name), np.ndarray)]
    placed = jax.device_put([[host[name][i] if name in host else getattr(layer, name)
                              for name in names] for i, layer in enumerate(zeros.layers)])
    return LoraStacks(tuple(
        replace(layer, **dict(zip(names, fields_i, strict=True)))
        for layer, fields_i in zip(zeros.layers, placed, strict=True)))


def zero_packed(config: LlamaConfig, max_rank: int, dtype="float32", *,
                on_host: bool = False) -> LoraStacks:
    """An all-zero packed adapter (fields without the slot axis), on the device (or host)."""
    _check_rank(max_rank)
    zeros = np.zeros if on_host else jnp.zeros
    shapes = _shapes(config, max_rank)
    return LoraStacks(tuple(
        LayerLora(**{name: zeros(shape, jnp.dtype(dtype)) for name, shape in shapes.items()})
        for _ in range(config.num_hidden_layers)))


def pack_adapter(config: LlamaConfig, modules: Mapping[str, Any], max_rank: int,
                 dtype="float32") -> LoraStacks:
    """One adapter as one slot, on the device (pack_host then place_packed): per layer,
    fields without the slot axis. Absent projections get zeros; r <= max_rank is zero-padded.
    """
    return place_packed(pack_host(config, modules, max_rank, dtype),
                        zero_packed(config, max_rank, dtype))


def set_slot(stacks: LoraStacks, slot: int | jax.Array, packed: LoraStacks) -> LoraStacks:
    """stacks (fields with a slot axis), packed (fields without) -> stacks with slot `slot`
    replaced.

    Pure; jit it with the stacks donated: XLA then writes the slot's block of each stack in
    place (the slot axis is first), so a fill costs one adapter's bytes whatever the slots.
    """
    if len(stacks.layers) != len(packed.layers):
        raise ValueError(f"packed adapter has {len(packed.layers)} layers, stacks have "
                         f"{len(stacks.layers)}")
    for field in fields(LayerLora):
        axis = SLOT_AXIS[field.name]
        have = getattr(stacks.layers[0], field.name).shape
        new = getattr(packed.layers[0], field.name).shape
        if have[:axis] + have[axis + 1:] != new:
            raise ValueError(f"packed adapter field {field.name!r} has shape {list(new)}, "
                             f"stacks expect {list(have[:axis] + have[axis + 1:])}")
    return LoraStacks(tuple(
        LayerLora(**{f.name: _set(getattr(s, f.name), SLOT_AXIS[f.name], slot, getattr(p, f.name))
                     for f in fields(LayerLora)})
        for s, p in zip(stacks.layers, packed.layers, strict=True)))


def stack_slots(packed: Sequence[LoraStacks]) -> LoraStacks:
    """Packed adapters (fields without a slot axis) -> stacks with slot i holding packed[i]."""
    return LoraStacks(tuple(
        LayerLora(**{f.name: jnp.stack([getattr(p, f.name) for p in layer], SLOT_AXIS[f.name])
                     for f in fields(LayerLora)})
        for layer in zip(*(p.layers for p in packed), strict=True)))


def map_with_slot_axis(fn, stacks: LoraStacks) -> LoraStacks:
    """fn(field array, its slot axis) applied to every field of every layer."""
    return LoraStacks(tuple(
        LayerLora(**{f.name: fn(getattr(layer, f.name), SLOT_AXIS[f.name])
                     for f in fields(LayerLora)})
        for layer in stacks.layers))


def _set(stack: jax.Array, axis: int, slot, value: jax.Array) -> jax.Array:
    # lax's update, not .at[].set: the latter's bounds check (a select around the update)
    # keeps XLA:CPU from updating the donated stack in place, so every fill rewrote it whole.
    # 16-bit floats are updated as their bits: XLA:CPU computes bfloat16 in float32, which
    # wraps the update in converts of the whole stack (a full copy per fill) otherwise.
    value = value.astype(stack.dtype)
    if stack.dtype.itemsize != 2:
        return jax.lax.dynamic_update_index_in_dim(stack, value, slot, axis)
    bits = jax.lax.dynamic_update_index_in_dim(
        jax.lax.bitcast_convert_type(stack, jnp.uint16),
        jax.lax.bitcast_convert_type(value, jnp.uint16), slot, axis)
    return jax.lax.bitcast_convert_type(bits, stack.dtype)
