"""Train LoRA adapters on a frozen base Llama, several at once: each batch row names its slot.

The step is the serving forward (models.Llama with LoRA stacks, one slot per adapter, and a slot
per row, through the same gathered kernels and their gradients), differentiated only w.r.t. the
stacks. Each adapter's loss is the mean over its own completion tokens and AdamW is elementwise,
so an adapter trained beside others ends up as it would alone (same data, same seed).

Trainable stacks hold PEFT's A and unscaled B; the scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA) multiplies B in the forward pass, as in PEFT, and is folded into B on export.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lora_jax.lora.adapters import LoRAAdapter, LoRAWeights, save_adapter
from lora_jax.progress import progress_bar
from lora_jax.training.datasets import Batch, Example, eval_rows, make_batch, shuffled_rows, stack
from lora_jax.training.fused import TIED_FIELDS, check_fused, count_shared_once, tie
from models import (
    PROJECTIONS,
    LayerLora,
    Llama,
    LlamaConfig,
    LoraStacks,
    init_kv_cache,
    pack_adapter,
)
from models.config import FUSED
from models.lora import EXPAND, PACKED, map_with_slot_axis, stack_slots


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: PEFT's r, lora_alpha, use_rslora, target_modules; seed draws A's
    initial values and the order of its examples."""

    name: str
    rank: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0

    def __post_init__(self):
        where = f"adapter {self.name!r}:"
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{where} rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"{where} alpha must be positive, got {self.alpha!r}")
        unknown = sorted(set(self.target_modules) - set(PROJECTIONS) - set(FUSED))
        if unknown or not self.target_modules:
            raise ValueError(f"{where} target_modules must be a non-empty subset of "
                             f"{list(PROJECTIONS)} (or Phi-3's fused {list(FUSED)}), got "
                             f"{list(self.target_modules)}")

    @property
    def projections(self) -> tuple[str, ...]:
        """The projections trained: a fused module (Phi-3's qkv_proj) stands for its parts."""
        parts = [p for t in self.target_modules for p in FUSED.get(t, (t,))]
        return tuple(p for p in PROJECTIONS if p in parts)

    @property
    def tied(self) -> tuple[str, ...]:
        """The fused modules among the targets: one A shared by their parts, as PEFT has it."""
        return tuple(f for f in FUSED if f in self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass(frozen=True)
class TrainConfig:
    """batch_size rows per adapter per micro-batch; grad_accum micro-batches per optimizer step;
    learning rate: linear warm-up, then cosine decay to 0 at `steps`. max_grad_norm clips each
    adapter's gradient on its own (None: no clipping); dropout is PEFT's lora_dropout."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    dropout: float = 0.0
    seed: int = 0
    eval_every: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("warmup_steps", self.warmup_steps), ("eval_every", self.eval_every)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")


def token_losses(model: Llama, stacks: LoraStacks | None, batch: Batch, *,
                 lora_backend: str | None = None, dropout=None) -> jax.Array:
    """Cross-entropy of each target times its weight, [B, L] float32 (stacks None: base only).

    The forward runs through a throwaway KV cache of one row per sequence; dropout is
    (key, rate) for the LoRA inputs or None.
    """
    rows, length = batch.tokens.shape
    kv = init_kv_cache(model.config, rows, length, model.dtype, bits=False)  # differentiated
    hidden, _ = model(batch.tokens, batch.positions, kv, jnp.arange(rows, dtype=jnp.int32),
                      stacks, batch.slot if stacks is not None else None,
                      lora_backend=lora_backend, lora_dropout=dropout)
    logits = model.logits(hidden)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets) * batch.weights


def _scaled(params: LoraStacks, scales: jax.Array, dtype) -> LoraStacks:
    """PEFT's forward: B times its adapter's scaling, everything in the model's dtype."""
    expand = set(EXPAND.values())
    return LoraStacks(tuple(
        LayerLora(**{f.name: (getattr(layer, f.name) * scales[:, None, None]
                              if f.name in expand else getattr(layer, f.name)).astype(dtype)
                     for f in fields(LayerLora)})
        for layer in params.layers))


def _per_slot(values: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
    """values [B, L] -> [num_slots] sums over each slot's rows (rows of slot -1 drop out)."""
    return jax.ops.segment_sum(values.sum(axis=1), slot, num_segments=num_slots)


def _clip_per_slot(grads: LoraStacks, max_norm: float, ties: jax.Array) -> LoraStacks:
    """optax.clip_by_global_norm for each adapter on its own: norms over the slot's entries
    (a shared A counted once, as PEFT's one tensor, not once per part)."""
    squares = map_with_slot_axis(lambda g, axis: jnp.sum(g * g, axis=_others(g, axis)),
                                 count_shared_once(grads, ties))
    norms = jnp.sqrt(sum(jax.tree.leaves(squares)))
    return _times_per_slot(grads, max_norm / jnp.maximum(norms, max_norm))


def _others(g: jax.Array, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(g.ndim) if i != axis)


def _times_per_slot(stacks: LoraStacks, values: jax.Array) -> LoraStacks:
    """Every field times values [num_slots], broadcast along its slot axis."""
    return map_with_slot_axis(lambda g, axis: g * jnp.expand_dims(values, _others(g, axis)),
                              stacks)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup_steps, config.steps - 1), config.steps,
        end_value=0.0)
    return optax.adamw(schedule, weight_decay=config.weight_decay)


# Module-level jits with hashable static arguments: trainers of the same shapes share programs.
@functools.partial(jax.jit, static_argnames=("graphdef", "config", "lora_backend"),
                   donate_argnums=(0, 1))
def _train_step(params, opt_state, state, masks, ties, scales, batches: Batch, key, *,
                graphdef, config: TrainConfig, lora_backend):
    """One optimizer step over batches [grad_accum, B, L] -> (params, opt_state, loss per slot)."""
    model = nnx.merge(graphdef, state)
    num_slots = scales.shape[0]

    def micro(carry, xs):
        grads, sums, counts = carry
        batch, index = xs
        dropout = (jax.random.fold_in(key, index), config.dropout) if config.dropout else None

        def loss(p):
            losses = token_losses(model, _scaled(p, scales, model.dtype), batch,
                                  lora_backend=lora_backend, dropout=dropout)
            per_slot = _per_slot(losses, batch.slot, num_slots)
            return per_slot.sum(), per_slot

        (_, per_slot), g = jax.value_and_grad(loss, has_aux=True)(params)
        counts = counts + _per_slot(batch.weights, batch.slot, num_slots)
        return (jax.tree.map(jnp.add, grads, g), sums + per_slot, counts), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(num_slots), jnp.zeros(num_slots))
    steps = jnp.arange(batches.tokens.shape[0])
    (grads, sums, counts), _ = jax.lax.scan(micro, init, (batches, steps))
    # Each adapter's gradient is that of the mean over its own tokens, whatever else is in the
    # batch; the masks keep projections an adapter does not target (and padded ranks) at zero.
    inverse = 1.0 / jnp.maximum(counts, 1.0)
    grads = tie(_times_per_slot(jax.tree.map(jnp.multiply, grads, masks), inverse), ties)
    if config.max_grad_norm is not None:
        grads = _clip_per_slot(grads, config.max_grad_norm, ties)
    updates, opt_state = _optimizer(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, sums * inverse


@functools.partial(jax.jit, static_argnames=("graphdef", "lora_backend"))
def _eval_step(params, state, scales, batch: Batch, *, graphdef, lora_backend):
    """Held-out loss sums and target counts per slot, [num_slots] each."""
    model = nnx.merge(graphdef, state)
    losses = token_losses(model, _scaled(params, scales, model.dtype), batch,
                          lora_backend=lora_backend)
    num_slots = scales.shape[0]
    return _per_slot(losses, batch.slot, num_slots), _per_slot(batch.weights, batch.slot, num_slots)


class LoRATrainer:
    """Adapters in slots 0..n-1 of one set of stacks, trained together on a frozen base model."""

    def __init__(self, model: Llama, adapters: Sequence[AdapterSpec], config: TrainConfig, *,
                 lora_backend: str | None = None):
        names = [a.name for a in adapters]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"adapters must be a non-empty list with unique names, got {names}")
        self.specs, self.config = tuple(adapters), config
        self.model_config: LlamaConfig = model.config
        check_fused(self.specs, model.config)
        self.ties = jnp.asarray([[f in a.tied for f in TIED_FIELDS.values()] for a in adapters],
                                jnp.float32)
        graphdef, self.state = nnx.split(model)
        self.max_rank = max(a.rank for a in adapters)
        self.params, self.masks = self._init_params()
        self.scales = jnp.asarray([a.scale for a in adapters], jnp.float32)
        self.opt_state = _optimizer(config).init(self.params)
        self.step = 0
        self._static = {"graphdef": graphdef, "lora_backend": lora_backend}

    def _init_params(self) -> tuple[LoraStacks, LoraStacks]:
        """PEFT's init: A kaiming-uniform (bound 1/sqrt(d_in)), B zeros; and the target masks."""
        shapes, layers = self.model_config.projection_shapes(), self.model_config.num_hidden_layers
        params, masks = [], []
        for spec in self.specs:
            modules, ones = {}, {}
            for proj in spec.projections:
                d_in, d_out = shapes[proj]
                # A fused module's parts draw the same A (one shared A, as in PEFT).
                first = next((p[0] for f, p in FUSED.items() if f in spec.tied and proj in p),
                             proj)
                rng = np.random.default_rng([spec.seed, PROJECTIONS.index(first)])
                bound = d_in**-0.5
                a = rng.uniform(-bound, bound, (layers, d_in, spec.rank)).astype(np.float32)
                modules[proj] = LoRAWeights(a, np.zeros((layers, spec.rank, d_out), np.float32))
                ones[proj] = LoRAWeights(np.ones_like(a), np.ones((layers, spec.rank, d_out)))
            params.append(pack_adapter(self.model_config, modules, self.max_rank))
            masks.append(pack_adapter(self.model_config, ones, self.max_rank))
        return stack_slots(params), stack_slots(masks)

    def train(self, train_sets: Sequence[Sequence[Example]],
              eval_sets: Sequence[Sequence[Example]] | None = None, *,
              progress: bool = True) -> list[dict]:
        """Run config.steps optimizer steps; one example list per adapter, in adapter order.

        Returns the history: {"step", "loss": {name: float}} per step, plus "eval_loss" on
        steps where it was measured (every eval_every steps and the last one, when eval_sets).
        """
        self._check_sets(train_sets, "train_sets")
        cfg, history = self.config, []
        streams = [shuffled_rows(data, cfg.batch_size, slot, spec.seed) for slot, (spec, data)
                   in enumerate(zip(self.specs, train_sets, strict=True))]
        base_key = jax.random.key(cfg.seed)
        bar = progress_bar(range(self.step, cfg.steps), desc="train", disable=not progress,
                   initial=self.step, total=cfg.steps)
        for step in bar:
            batches = stack([make_batch([row for s in streams for row in next(s)], cfg.seq_len)
                             for _ in range(cfg.grad_accum)])
            self.params, self.opt_state, loss = _train_step(
                self.params, self.opt_state, self.state, self.masks, self.ties, self.scales,
                batches, jax.random.fold_in(base_key, step), config=cfg, **self._static)
            self.step = step + 1
            record = {"step": self.step, "loss": self._by_name(np.asarray(loss))}
            bar.set_postfix({k: f"{v:.3f}" for k, v in record["loss"].items()}, refresh=False)
            if eval_sets is not None and (self.step == cfg.steps or (
                    cfg.eval_every and self.step % cfg.eval_every == 0)):
                record["eval_loss"] = self.evaluate(eval_sets)
                if progress:
                    bar.write(f"step {self.step} eval loss: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in record["eval_loss"].items()))
            history.append(record)
        return history

    def evaluate(self, eval_sets: Sequence[Sequence[Example]]) -> dict[str, float]:
        """Mean loss over each adapter's held-out completion tokens (NaN where it has none)."""
        self._check_sets(eval_sets, "eval_sets")
        rows = self.config.batch_size * len(self.specs)
        sums, counts = np.zeros(len(self.specs)), np.zeros(len(self.specs))
        for slot, examples in enumerate(eval_sets):
            for chunk in eval_rows(examples, rows, slot):
                s, c = _eval_step(self.params, self.state, self.scales,
                                  make_batch(chunk, self.config.seq_len), **self._static)
                sums, counts = sums + np.asarray(s), counts + np.asarray(c)
        losses = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        return self._by_name(losses)

    def adapters(self, base_model_name: str | None = None) -> list[LoRAAdapter]:
        """The trained adapters as served: per-projection a [L, d_in, r], b [L, r, d_out] float32
        with the scaling folded into b."""
        host = jax.tree.map(np.asarray, self.params)
        out = []
        for slot, spec in enumerate(self.specs):
            modules = {}
            for proj in spec.projections:
                a_field = next(f for f, group in PACKED.items() if proj in group)
                start = PACKED[a_field].index(proj) * self.max_rank
                a = np.stack([getattr(layer, a_field)[slot, :, start:start + spec.rank]
                              for layer in host.layers])
                b = np.stack([getattr(layer, EXPAND[proj])[slot, :spec.rank, :]
                              for layer in host.layers]) * np.float32(spec.scale)
                modules[proj] = LoRAWeights(np.ascontiguousarray(a), np.ascontiguousarray(b))
            config = {"r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": spec.use_rslora,
                      "target_modules": sorted(spec.target_modules),
                      "lora_dropout": self.config.dropout}
            out.append(LoRAAdapter(spec.name, modules, base_model_name=base_model_name,
                                   config=config))
        return out

    def save(self, folder: str | Path, base_model_name_or_path: str) -> list[Path]:
        """Each adapter as a PEFT folder folder/<name> (adapter_config.json + safetensors)."""
        return [save_adapter(adapter, Path(folder) / spec.name, lora_alpha=spec.alpha,
                             use_rslora=spec.use_rslora,
                             base_model_name_or_path=base_model_name_or_path,
                             base=self.model_config)
                for spec, adapter in zip(self.specs, self.adapters(), strict=True)]

    def _by_name(self, values: np.ndarray) -> dict[str, float]:
        return dict(zip((a.name for a in self.specs), values.tolist(), strict=True))

    def _check_sets(self, sets: Sequence, what: str) -> None:
        if len(sets) != len(self.specs):
            raise ValueError(f"{what} has {len(sets)} example lists for {len(self.specs)} "
                             "adapters; pass one per adapter, in order")
