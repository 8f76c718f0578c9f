"""Tensor parallelism: logical axes -> mesh axes, and the weight layouts a split needs.

Every weight declares logical axes beside its definition (PARAM_AXES in models.llama,
LORA_AXES in models.lora, KV_AXES in models.kv_cache); RULES maps those names to mesh axes, so
how the model splits is decided here, in one table, and nowhere else. Megatron's split:

- q|k|v and gate|up column-parallel (their output split), o and down row-parallel (their input
  split; XLA adds the all-reduce of the output). Heads stay whole on a device.
- The packed q|k|v (gate|up) output axis is stored shard-major when split: [q_0 | k_0 | v_0 |
  q_1 | k_1 | v_1 | ...], so device i holds exactly its heads of q, k and v and the split into
  q, k, v after the one packed matmul is local (models.layers). The alternative, q, k and v as
  separate weights, costs three matmuls instead of one for no gain in communication (none
  either way).
- The KV pool is split over kv heads. With more shards than kv heads, each kv head is
  repeated (tp / kv_heads copies, as vLLM does), so every device holds the one kv head its
  query heads read: the sharded model is an ordinary GQA model with tp kv heads.
- LoRA: column-parallel projections keep A whole and split B's output; row-parallel ones
  split A's input (the [T, slots * R] shrink result is all-reduced, small) and keep B whole.
- Embedding and lm_head split over the vocabulary (when tp divides it): Llama-3's are 1 GB
  each in bfloat16, a copy per device. The lookup is a gather from a split table (each device
  contributes the rows it holds); the logits come out split and are gathered whole per row
  for the sampler ([rows, V], small). A tied lm_head is the embedding: split the same way.
- Family weights (models.families): q|k|v biases split with their columns, in the same
  shard-major layout; q/k norms and Gemma's extra norms replicated.
- Norms ([D], [head_dim]) are replicated: each is a few KiB.
- The model is loaded straight into this split (models.shard_loading): each device's slice is
  read from the checkpoint; no device and no host buffer ever holds a whole model.
"""

from dataclasses import fields, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import LlamaConfig
from models.kv_cache import KV_AXES, KVCache, init_paged_kv_cache
from models.llama import PARAM_AXES
from models.lora import LORA_AXES, LayerLora, LoraStacks, init_lora_stacks
from models.tp_kernels import TP

# Logical axis -> mesh axis (None: replicated). A "dp" axis would map a batch axis here.
RULES: dict[str, str | None] = {
    "heads": TP, "kv_heads": TP, "mlp": TP, "qkv": TP, "gate_up": TP,
    "vocab": TP, "embed": None, "head_dim": None, "slots": None, "rank": None,
    "layers": None, "blocks": None, "block": None, "rows": None,
}


def check_divisible(config: LlamaConfig, tp: int) -> None:
    """ValueError naming the fix when `tp` shards cannot split this model evenly."""
    h, kv, i = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    fix = "choose a tensor_parallel_size that divides it"
    if h % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's "
                         f"{h} attention heads; {fix}")
    if i % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's "
                         f"intermediate size {i}; {fix}")
    if kv % tp and tp % kv:
        raise ValueError(f"tensor_parallel_size {tp} neither divides the model's {kv} kv heads "
                         f"nor is a multiple of them (then kv heads are replicated); {fix}")


def sharded_config(config: LlamaConfig, tp: int) -> LlamaConfig:
    """The config the split model runs: kv heads repeated up to tp, packed layout for tp."""
    check_divisible(config, tp)
    return replace(config, num_key_value_heads=max(config.num_key_value_heads, tp),
                   packed_shards=tp)


class TensorParallel:
    """A model's split over the `tp` axis of `mesh`: shardings and layouts of every array."""

    def __init__(self, config: LlamaConfig, mesh: Mesh, rules: dict | None = None):
        self.mesh, self.rules = mesh, dict(RULES if rules is None else rules)
        self.size = mesh.shape[TP]
        if config.vocab_size % self.size:  # an uneven split is not a NamedSharding: replicate
            self.rules["vocab"] = None
        self.base_config = config
        self.config = sharded_config(config, self.size)
        self.kv_repeat = self.config.num_key_value_heads // config.num_key_value_heads

    def sharding(self, axes: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*(self.rules[a] for a in axes)))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    # The model -----------------------------------------------------------------------------

    def param_sharding(self, name: str) -> NamedSharding:
        """The sharding of the split model's parameter `name` (a PARAM_AXES key)."""
        return self.sharding(PARAM_AXES[name])

    def _repeat_kv(self, w):
        """[..., KV * hd] -> [..., KV * repeat * hd]: each kv head `repeat` times, in place."""
        if self.kv_repeat == 1:
            return w
        hd = self.base_config.head_dim
        xp = np if isinstance(w, np.ndarray) else jnp
        heads = w.reshape(*w.shape[:-1], -1, hd)
        return xp.repeat(heads, self.kv_repeat, axis=-2).reshape(*w.shape[:-1], -1)

    # The KV pool ---------------------------------------------------------------------------

    def init_kv(self, num_blocks: int, block_size: int, dtype) -> KVCache:
        """The paged pool made directly in its shards (no device ever holds all of it)."""
        spec = self.sharding(KV_AXES)
        out = KVCache(spec, spec, dtype=jnp.dtype(dtype).name)
        make = jax.jit(lambda: init_paged_kv_cache(self.config, num_blocks, block_size, dtype),
                       out_shardings=out)
        return make()

    # LoRA stacks ---------------------------------------------------------------------------

    def stack_shardings(self, stacks: LoraStacks) -> LoraStacks:
        return LoraStacks(tuple(
            LayerLora(**{f.name: self.sharding(LORA_AXES[f.name]) for f in fields(LayerLora)})
            for _ in stacks.layers))

    def layout_lora(self, stacks: LoraStacks) -> LoraStacks:
        """Stacks or one packed adapter in the checkpoint's shapes -> the split model's (k and
        v expand matrices with their kv heads repeated; traceable, used inside the slot fill)."""
        if self.kv_repeat == 1:
            return stacks
        return LoraStacks(tuple(
            replace(layer, k_b=self._repeat_kv(layer.k_b), v_b=self._repeat_kv(layer.v_b))
            for layer in stacks.layers))

    def init_stacks(self, num_slots: int, max_rank: int, dtype) -> LoraStacks:
        """Empty adapter stacks made directly in their shards, in the split model's shapes
        (k and v expand matrices as wide as the repeated kv heads)."""
        shapes = jax.eval_shape(lambda: init_lora_stacks(self.config, num_slots, max_rank,
                                                         dtype))
        make = jax.jit(lambda: init_lora_stacks(self.config, num_slots, max_rank, dtype),
                       out_shardings=self.stack_shardings(shapes))
        return make()


def interleave(parts: list[np.ndarray], shards: int) -> np.ndarray:
    """Column blocks [..., w_i] -> [..., sum w_i] shard-major: shard j's slice of every part,
    then shard j+1's (models.layers.split_packed undoes it per shard)."""
    lead = parts[0].shape[:-1]
    cut = [p.reshape(*lead, shards, p.shape[-1] // shards) for p in parts]
    return np.concatenate(cut, axis=-1).reshape(*lead, -1)
