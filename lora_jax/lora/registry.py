"""The CPU-side adapter registry: loaded adapters by lora_int_id, least recently used first.

An adapter is read from disk (or the Hub) once and kept here while it fits in `capacity`; the
device slots (slots.py) take their weights from it. Adapters handed over in memory have no path
to reload them from, so they are never evicted; nor is an adapter the caller protects (in a
slot, pinned).
"""

from collections import OrderedDict
from pathlib import Path

from lora_jax.lora.adapters import LoRAAdapter, load_adapter
from lora_jax.request import LoRARequest
from models import LlamaConfig, pack_adapter


class AdapterRegistry:
    def __init__(self, base: LlamaConfig, *, max_lora_rank: int, capacity: int,
                 served: str, served_path: Path):
        self.base, self.max_lora_rank, self.capacity = base, max_lora_rank, capacity
        self._served = served  # the model as the user named it, for error messages
        self._served_names = {served, str(served_path), served_path.name}
        self._loaded: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()
        self._in_memory: set[int] = set()

    def ids(self) -> set[int]:
        return set(self._loaded)

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._loaded

    def adapter(self, lora_id: int) -> LoRAAdapter:
        return self._loaded[lora_id][1]

    def register(self, req: LoRARequest,
                 adapter: LoRAAdapter | None = None) -> tuple[LoRAAdapter, bool]:
        """The adapter for req: the known one, or loaded from req's path, or the given weights
        -> (adapter, whether it replaced weights already registered under req's id)."""
        known = self._loaded.get(req.lora_int_id)
        if known is not None and adapter is None:
            if known[0].lora_path != req.lora_path:
                raise ValueError(f"lora_int_id {req.lora_int_id} is already registered for "
                                 f"{known[0].lora_path!r}; adapter {req.lora_name!r} at "
                                 f"{req.lora_path!r} needs its own id")
            self._loaded.move_to_end(req.lora_int_id)
            return known[1], False
        self._check_base_model(req)
        if adapter is None:
            adapter = load_adapter(req.lora_path, name=req.lora_name, base=self.base,
                                   max_lora_rank=self.max_lora_rank)
        else:
            self._check_in_memory(req, adapter)
            self._in_memory.add(req.lora_int_id)
        self._loaded[req.lora_int_id] = (req, adapter)
        return adapter, known is not None

    def reload(self, req: LoRARequest) -> LoRAAdapter:
        """Read req's adapter from its path again (it may be a new path) and register it under
        req's id, replacing what the id held."""
        self._check_base_model(req)
        adapter = load_adapter(req.lora_path, name=req.lora_name, base=self.base,
                               max_lora_rank=self.max_lora_rank)
        self._in_memory.discard(req.lora_int_id)
        self._loaded[req.lora_int_id] = (req, adapter)
        self._loaded.move_to_end(req.lora_int_id)
        return adapter

    def trim(self, protected: set[int]) -> None:
        """Evict least recently used adapters beyond capacity, never a protected or in-memory
        one (so the registry may stay above capacity while they hold it)."""
        keep = protected | self._in_memory
        while len(self._loaded) > self.capacity:
            victim = next((i for i in self._loaded if i not in keep), None)
            if victim is None:
                break
            del self._loaded[victim]

    def remove(self, lora_id: int) -> bool:
        self._in_memory.discard(lora_id)
        return self._loaded.pop(lora_id, None) is not None

    def _check_in_memory(self, req: LoRARequest, adapter: LoRAAdapter) -> None:
        """What load_adapter checks of a folder (shapes, rank), for weights handed over in
        memory: fail here, not later inside a step that serves other requests too."""
        try:
            pack_adapter(self.base, adapter.modules, self.max_lora_rank)
        except ValueError as err:
            raise ValueError(f"adapter {req.lora_name!r}: {err}") from err

    def _check_base_model(self, req: LoRARequest) -> None:
        name = req.base_model_name
        if name is None or name in self._served_names or Path(name).name in self._served_names:
            return
        raise ValueError(f"adapter {req.lora_name!r} is for base model {name!r}, but this LLM "
                         f"serves {self._served!r}")
