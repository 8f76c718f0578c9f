"""The adapter manager: every adapter the engine knows, its device slot, and its version.

Adapters live in two tiers: the CPU registry (registry.py: read from disk or the Hub once,
least recently used evicted beyond its capacity) and the device slots (slots.py: `max_loras`
stacked tensors the step reads). A request's adapter is registered when the request arrives
and given a slot when a step that runs it is dispatched. Pinned adapters keep their slot; the
scheduler counts them (and the adapters of running sequences) against max_loras.

An adapter's identity for the prefix cache is (lora_int_id, version): the version changes
whenever new weights take the id, so KV computed under the old weights is never reused.
"""

import weakref
from pathlib import Path

from lora_jax.core.scheduler import Batch, Scheduler
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.lora.registry import AdapterRegistry
from lora_jax.lora.slots import AdapterSlots
from lora_jax.request import LoRARequest
from models.config import LlamaConfig


class AdapterManager:
    """Add, reload, remove and pin adapters; slots for a step's adapters. `slots` is None
    when LoRA is off (then every adapter call but list_loras raises ValueError)."""

    def __init__(self, model_config: LlamaConfig, *, slots: AdapterSlots | None,
                 scheduler: Scheduler, max_loras: int, max_lora_rank: int, capacity: int,
                 served: str, served_path: Path):
        self.slots, self.scheduler, self.max_loras = slots, scheduler, max_loras
        self.registry = AdapterRegistry(model_config, max_lora_rank=max_lora_rank,
                                        served=served, served_path=served_path,
                                        capacity=capacity)
        self._versions: dict[int, tuple[weakref.ref, int]] = {}
        self._last_version = 0

    @property
    def stacks(self):
        """The device stacks the step reads (None without LoRA)."""
        return self.slots.stacks if self.slots is not None else None

    @property
    def num_loads(self) -> int:
        return self.slots.num_loads if self.slots is not None else 0

    def _require_lora(self, req: LoRARequest) -> None:
        if self.slots is None:
            raise ValueError(f"adapter {req.lora_name!r} was requested but LoRA is off; "
                             "create the LLM with enable_lora=True")

    def add(self, req: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Load (or take the given in-memory) adapter into the CPU registry; reuse it when
        known. New weights under an id already in a slot replace it there, compiling nothing."""
        self._require_lora(req)
        adapter, replaced = self.registry.register(req, adapter)
        if replaced:
            self.slots.reload(req.lora_int_id, adapter)
        self.registry.trim(protected=set(self.slots.loaded()) | self.scheduler.pinned())
        return adapter

    def reload(self, req: LoRARequest) -> LoRAAdapter:
        """Load req's adapter from its path again under its id (vLLM's load_inplace): new
        weights replace the old in the CPU registry and in its slot, compiling nothing; cached
        prefixes of the old weights are never reused."""
        self._require_lora(req)
        adapter = self.registry.reload(req)
        self.slots.reload(req.lora_int_id, adapter)
        return adapter

    def remove(self, lora_id: int) -> bool:
        if lora_id in self.scheduler.adapters_in_use():
            raise ValueError(f"adapter {lora_id} is used by running requests; remove it later")
        self.scheduler.unpin(lora_id)
        if self.slots is not None:
            self.slots.evict(lora_id)
        return self.registry.remove(lora_id)

    def ids(self) -> set[int]:
        return self.registry.ids()

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.registry or self.slots is None:
            raise ValueError(f"adapter {lora_id} is not loaded; add_lora it first")
        held = self.scheduler.held_adapters()
        if lora_id not in held and len(held) >= self.max_loras:
            raise ValueError(f"cannot pin adapter {lora_id}: all {self.max_loras} "
                             "slots are held by pinned or running adapters")
        self.slots.activate({lora_id: self.registry.adapter(lora_id)}, keep=held)
        self.scheduler.pin(lora_id)
        return True

    def identity(self, lora_id: int, adapter: LoRAAdapter) -> tuple[int, int]:
        """(id, version): the version changes whenever new weights take the id, so KV cached
        under old weights is never reused."""
        known = self._versions.get(lora_id)
        if known is None or known[0]() is not adapter:
            # Weak references and a counter: an adapter dropped from the registry (unloaded,
            # or evicted) is not kept alive here, and no version is handed out twice.
            self._versions = {i: v for i, v in self._versions.items() if v[0]() is not None}
            self._last_version += 1
            self._versions[lora_id] = known = (weakref.ref(adapter), self._last_version)
        return lora_id, known[1]

    def activate(self, batch: Batch) -> None:
        """A slot for every adapter of the batch, evicting none that a running sequence or a
        pin holds. Each sequence's request carries the adapter it was admitted with."""
        if self.slots is None:
            return
        needed = {s.adapter: s.request.adapter for s in batch.seqs() if s.adapter is not None}
        self.slots.activate(needed, keep=self.scheduler.held_adapters())

    def slot_of(self, lora_id: int | None) -> int:
        """The slot of an adapter activated for this step; -1 for the base model."""
        return self.slots.slot_of(lora_id) if lora_id is not None else -1
