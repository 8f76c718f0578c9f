"""The host tiers of adapters: every adapter the engine knows (the disk tier: its request,
its version) and the loaded ones (the CPU tier: a CpuAdapterCache bounded by count and bytes).

Knowing an adapter costs a LoRARequest; its weights are read (`read`, safe to call from the
loader's threads) only when a request needs them, and kept while the CPU tier's bounds allow.
Adapters handed over in memory have no path to read them again from, so they are never
evicted; nor is an adapter the caller protects (wanted by a waiting request).

An adapter's version changes whenever new weights take its id (in memory, reload, a new
registration after removal), so prefixes cached under old weights are never reused. Reading
the same files again after an eviction keeps the version.
"""

from pathlib import Path

import numpy as np

from lora_jax.lora.adapters import LoRAAdapter, load_adapter
from lora_jax.lora.cpu_cache import CpuAdapterCache
from lora_jax.request import LoRARequest
from models import LlamaConfig
from models.lora import pack_host


def adapter_bytes(adapter: LoRAAdapter) -> int:
    """Host bytes of an adapter's weights, with their packed copy when it has one."""
    packed = 0 if adapter.packed is None else sum(int(v.nbytes)
                                                 for v in adapter.packed.fields.values())
    return packed + sum(int(np.asarray(w.a).nbytes + np.asarray(w.b).nbytes)
                        for w in adapter.modules.values())


def full_adapter_bytes(base: LlamaConfig, rank: int) -> int:
    """Bytes of an adapter of `rank` on every projection, the largest one served: its float32
    weights and their packed copy (as many elements, in at most 4 bytes each)."""
    return 2 * 4 * base.num_hidden_layers * rank * sum(
        d_in + d_out for d_in, d_out in base.projection_shapes().values())


class AdapterRegistry:
    def __init__(self, base: LlamaConfig, *, max_lora_rank: int, max_count: int,
                 max_bytes: int | None = None, served: str, served_path: Path):
        self.base, self.max_lora_rank = base, max_lora_rank
        self._served = served  # the model as the user named it, for error messages
        self._served_names = {served, str(served_path), served_path.name}
        self._known: dict[int, LoRARequest] = {}
        self._versions: dict[int, int] = {}
        self._last_version = 0
        self.cache = CpuAdapterCache(max_count, max_bytes, size_of=adapter_bytes)

    def ids(self) -> set[int]:
        return set(self._known)

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._known

    def request(self, lora_id: int) -> LoRARequest:
        return self._known[lora_id]

    def is_cached(self, lora_id: int) -> bool:
        return lora_id in self.cache

    def adapter(self, lora_id: int) -> LoRAAdapter:
        """The loaded weights (now the most recently used); KeyError if not in the CPU tier."""
        return self.cache.get(lora_id)

    def version(self, lora_id: int) -> int:
        return self._versions[lora_id]

    def register(self, req: LoRARequest) -> bool:
        """Know req's adapter (reading nothing) -> whether its weights are in the CPU tier.
        A base model other than the served one, or an id known under another path, raise."""
        known = self._known.get(req.lora_int_id)
        if known is not None:
            if known.lora_path != req.lora_path:
                raise ValueError(f"lora_int_id {req.lora_int_id} is already registered for "
                                 f"{known.lora_path!r}; adapter {req.lora_name!r} at "
                                 f"{req.lora_path!r} needs its own id")
            return req.lora_int_id in self.cache
        self._check_base_model(req)
        self._known[req.lora_int_id] = req
        self._new_version(req.lora_int_id)
        return False

    def read(self, req: LoRARequest) -> LoRAAdapter:
        """Read and validate req's adapter from its path (touches no state: any thread)."""
        return load_adapter(req.lora_path, name=req.lora_name, base=self.base,
                            max_lora_rank=self.max_lora_rank)

    def store(self, req: LoRARequest, adapter: LoRAAdapter) -> bool:
        """Keep weights read for req, unless its id was removed or taken by another path
        since the read began -> whether they were kept."""
        known = self._known.get(req.lora_int_id)
        if known is None or known.lora_path != req.lora_path:
            return False
        self.cache.put(req.lora_int_id, adapter)
        return True

    def put_in_memory(self, req: LoRARequest, adapter: LoRAAdapter) -> bool:
        """Weights handed over in memory for req's id (never evicted) -> whether they replace
        weights known under that id."""
        self._check_base_model(req)
        self._check_in_memory(req, adapter)
        replaced = req.lora_int_id in self._known
        self._known[req.lora_int_id] = req
        self.cache.put(req.lora_int_id, adapter, sticky=True)
        self._new_version(req.lora_int_id)
        return replaced

    def reload(self, req: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Read req's adapter from its path again (it may be a new path; `adapter`: already
        read from it) and register it under req's id, replacing what the id held."""
        self._check_base_model(req)
        if adapter is None:
            adapter = self.read(req)
        self._known[req.lora_int_id] = req
        self.cache.put(req.lora_int_id, adapter)
        self._new_version(req.lora_int_id)
        return adapter

    def trim(self, protected: set[int]) -> list[int]:
        """Evict least recently used weights beyond the bounds -> the evicted ids (still
        known: a later request reads them again)."""
        return self.cache.trim(protected)

    def remove(self, lora_id: int) -> bool:
        self.cache.remove(lora_id)
        self._versions.pop(lora_id, None)
        return self._known.pop(lora_id, None) is not None

    def _new_version(self, lora_id: int) -> None:
        self._last_version += 1
        self._versions[lora_id] = self._last_version

    def _check_in_memory(self, req: LoRARequest, adapter: LoRAAdapter) -> None:
        """What load_adapter checks of a folder (shapes, rank), for weights handed over in
        memory: fail here, not later inside a step that serves other requests too."""
        try:
            pack_host(self.base, adapter.modules, self.max_lora_rank)
        except ValueError as err:
            raise ValueError(f"adapter {req.lora_name!r}: {err}") from err

    def _check_base_model(self, req: LoRARequest) -> None:
        name = req.base_model_name
        if name is None or name in self._served_names or Path(name).name in self._served_names:
            return
        raise ValueError(f"adapter {req.lora_name!r} is for base model {name!r}, but this LLM "
                         f"serves {self._served!r}")
