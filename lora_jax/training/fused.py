"""Training an adapter on a fused module (Phi-3's qkv_proj, gate_up_proj) as PEFT does: one A
shared by the module's parts. The trainer keeps a copy of that A in each part's slice of the
packed A; the copies start equal and get the same (summed) gradient, so they stay equal, and
saving writes them back as the one fused module."""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from models import LlamaConfig, LoraStacks
from models.config import FUSED
from models.lora import SLOT_AXIS

# The packed A field holding each fused module's parts, in the same order (q|k|v, gate|up).
TIED_FIELDS = {"qkv_a": "qkv_proj", "gate_up_a": "gate_up_proj"}


def _over_tied(stacks: LoraStacks, ties: jax.Array, fn) -> LoraStacks:
    """fn(parts [S, ..., n, R], tied [S, 1, 1, 1]) -> parts, on each fused module's packed A
    (ties [S, len(TIED_FIELDS)]: 1 where that slot's adapter targets the fused module)."""
    def one(layer):
        out = {}
        for i, (field, fused) in enumerate(TIED_FIELDS.items()):
            g = getattr(layer, field)
            parts = g.reshape(*g.shape[:-1], len(FUSED[fused]), -1)
            others = tuple(d for d in range(parts.ndim) if d != SLOT_AXIS[field])
            tied = jnp.expand_dims(ties[:, i], others)
            out[field] = fn(parts, tied).reshape(g.shape)
        return dataclasses.replace(layer, **out)

    return LoraStacks(tuple(one(layer) for layer in stacks.layers))


def tie(grads: LoraStacks, ties: jax.Array) -> LoraStacks:
    """A fused module's parts share one A (PEFT's qkv_proj): each part's copy gets the sum of
    the parts' gradients, the shared A's gradient; equal at init, the copies stay equal."""
    return _over_tied(grads, ties, lambda parts, tied: jnp.where(
        tied > 0, jnp.broadcast_to(parts.sum(-2, keepdims=True), parts.shape), parts))


def count_shared_once(grads: LoraStacks, ties: jax.Array) -> LoraStacks:
    """The gradients with each shared A's copies scaled by 1/sqrt(parts): their squares add up
    to the shared A's once (for the gradient norm PEFT clips by)."""
    return _over_tied(grads, ties, lambda parts, tied: parts * jnp.where(
        tied > 0, parts.shape[-2] ** -0.5, 1.0))


def check_fused(specs: Sequence, config: LlamaConfig) -> None:
    """A fused target (qkv_proj) on a family that has no such module is refused, naming its
    parts, which are what that family's PEFT adapters target."""
    for spec in specs:
        foreign = [f for f in spec.tied if f not in config.peft_modules]
        if foreign:
            parts = [p for f in foreign for p in FUSED[f]]
            raise ValueError(f"adapter {spec.name!r}: target_modules {foreign} are fused modules "
                             f"this model does not have (its modules: {list(config.peft_modules)}"
                             f"); target their parts {parts} instead")

