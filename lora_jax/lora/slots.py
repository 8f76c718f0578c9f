"""Device slots for adapters: the stacked LoRA tensors the jitted step reads.

Filling a slot is one jitted, donated update with the slot index as a traced argument, so
loading, swapping and evicting adapters never compiles anything new after the first fill.
"""

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.adapters import HostPacked, LoRAAdapter
from models.config import LlamaConfig
from models.lora import (
    SITES,
    LoraStacks,
    init_lora_stacks,
    pack_host,
    place_packed,
    set_slot,
    sites_of,
    zero_packed,
)
from models.sharding import TensorParallel


class AdapterSlots:
    """num_slots device slots, least-recently-used eviction, never evicting an adapter in use."""

    def __init__(self, config: LlamaConfig, num_slots: int, max_rank: int, dtype="float32",
                 tensor_parallel: TensorParallel | None = None):
        """tensor_parallel: the stacks live in the shards of that split (models.sharding), and
        every fill writes each device's part in place."""
        self.config, self.max_rank, self.dtype = config, max_rank, dtype
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, LRU first
        self._free = list(range(num_slots - 1, -1, -1))
        self._sites = np.zeros((num_slots, len(SITES)), np.bool_)  # the LoRA sites each uses
        self.num_loads = 0  # adapters written into a slot (swaps in and reloads), for metrics
        # Several processes sharing the mesh: a lora_jax.worker.distributed.StepChannel.
        self.channel = None
        # An all-zero adapter on the device: a fill takes the fields its adapter leaves alone
        # from here instead of transferring zeros. Split over devices, it stays on the host
        # (whole on one device, it would unbalance the devices' memory).
        self._zeros = zero_packed(config, max_rank, dtype, on_host=tensor_parallel is not None)
        if tensor_parallel is None:
            self.stacks: LoraStacks = init_lora_stacks(config, num_slots, max_rank, dtype)
            self._set = jax.jit(set_slot, donate_argnums=0)
        else:
            tp = tensor_parallel
            self.stacks = tp.init_stacks(num_slots, max_rank, dtype)
            self._set = jax.jit(lambda stacks, slot, packed: set_slot(
                stacks, slot, tp.layout_lora(packed)), donate_argnums=0,
                out_shardings=tp.stack_shardings(self.stacks))

    def slot_of(self, lora_id: int) -> int | None:
        return self._slot_of.get(lora_id)

    def loaded(self) -> list[int]:
        return list(self._slot_of)

    def activate(self, adapters: Mapping[int, LoRAAdapter], keep: set[int]) -> None:
        """Give each adapter a slot; evict only adapters outside `keep` and outside `adapters`."""
        protected = keep | set(adapters)
        for lora_id, adapter in adapters.items():
            if lora_id in self._slot_of:
                self._slot_of.move_to_end(lora_id)
                continue
            if not self._free:
                victim = next((i for i in self._slot_of if i not in protected), None)
                if victim is None:
                    raise RuntimeError(f"no free adapter slot for adapter {lora_id}: all "
                                       f"{len(self._slot_of)} slots hold adapters in use")
                self._free.append(self._slot_of.pop(victim))
            self._slot_of[lora_id] = self._free.pop()
            self._write(self._slot_of[lora_id], adapter)

    def reload(self, lora_id: int, adapter: LoRAAdapter) -> None:
        """New weights for an adapter already in a slot (same shapes: nothing recompiles)."""
        if lora_id in self._slot_of:
            self._write(self._slot_of[lora_id], adapter)

    def evict(self, lora_id: int) -> None:
        slot = self._slot_of.pop(lora_id, None)
        if slot is not None:
            self._free.append(slot)

    def warm(self) -> None:
        """Compile the slot fill before serving: write zeros into slot 0 (free at start-up,
        and zeros already)."""
        self.stacks = self._set(self.stacks, jnp.int32(0), self._zeros)

    def sites(self, lora_ids) -> np.ndarray:
        """The LoRA sites (models.lora.SITES) any of these adapters, each in a slot, uses."""
        used = [self._slot_of[i] for i in lora_ids]
        return self._sites[used].any(axis=0) if used else np.zeros(len(SITES), np.bool_)

    def prepare(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """The adapter with its weights packed into the slots' layout on the host (pure: the
        loader's threads call it), so that its fill only places and writes them."""
        return replace(adapter, packed=HostPacked(
            self.max_rank, jnp.dtype(self.dtype).name,
            pack_host(self.config, adapter.modules, self.max_rank, self.dtype)))

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        self._sites[slot] = sites_of(adapter.modules)
        packed = adapter.packed
        if packed is not None and (packed.max_rank, packed.dtype) == (
                self.max_rank, jnp.dtype(self.dtype).name):
            host = packed.fields
        else:  # handed over in memory, or read before the slots existed
            host = pack_host(self.config, adapter.modules, self.max_rank, self.dtype)
        packed = place_packed(host, self._zeros)
        self.num_loads += 1
        if self.channel is not None:  # several processes: the others fill the same slot
            packed = self.channel.send_fill(slot, packed)
        self.stacks = self._set(self.stacks, jnp.int32(slot), packed)

    def follow(self, slot: int) -> None:
        """Another process than 0: fill `slot` with the adapter process 0 sends."""
        packed = self.channel.receive(self._zeros)
        self.stacks = self._set(self.stacks, jnp.int32(slot), packed)
