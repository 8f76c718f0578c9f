"""The adapter manager: adapters in tiers, loads off the step path, and versions.

Tiers: disk (every adapter the engine knows: a request and a version) -> CPU (the weights of
loaded adapters, bounded by count and bytes: registry.py) -> device slots (`max_loras`
stacked tensors the step reads: slots.py). A request whose adapter is in neither a slot nor
the CPU tier waits in the scheduler's queue while a background loader (loader.py) reads and
validates it; `update`, called once per step, collects finished loads and starts the next
ones for the waiting requests, oldest first. Filling a slot (one donated jitted update) is the
only adapter work left on the engine thread. `add_lora`, `reload` and `pin` are explicit calls
and read at once.

An adapter's identity for the prefix cache is (lora_int_id, version): the version changes
whenever new weights take the id, so KV computed under the old weights is never reused.
"""

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lora_jax.core.scheduler import Batch, Scheduler
from lora_jax.lora.adapters import LoRAAdapter
from lora_jax.lora.loader import AdapterLoader
from lora_jax.lora.metrics import AdapterCounters
from lora_jax.lora.registry import AdapterRegistry, full_adapter_bytes
from lora_jax.lora.slots import AdapterSlots
from lora_jax.outputs import AdapterStat
from lora_jax.request import LoRARequest
from models.config import LlamaConfig

# Failed loads remembered for the caller that asks why (LLM.generate re-raises them).
MAX_REMEMBERED_FAILURES = 64


@dataclass(frozen=True)
class ReadWeights:
    """An adapter read from its path outside the engine thread, and the seconds it took."""

    adapter: LoRAAdapter
    seconds: float


class AdapterManager:
    """Add, reload, remove and pin adapters; slots for a step's adapters. `slots` is None
    when LoRA is off (then every adapter call but list_loras raises ValueError).

    `reader(request) -> LoRAAdapter` reads an adapter in the loader's threads (replace it to
    read from elsewhere, or to slow reads down in a test)."""

    def __init__(self, model_config: LlamaConfig, *, slots: AdapterSlots | None,
                 scheduler: Scheduler, max_loras: int, max_lora_rank: int, max_cpu_loras: int,
                 max_cpu_lora_bytes: int | None, served: str, served_path: Path,
                 load_workers: int = 2):
        self.slots, self.scheduler, self.max_loras = slots, scheduler, max_loras
        if max_cpu_lora_bytes is None:  # the count bound, at the largest adapter served
            max_cpu_lora_bytes = max_cpu_loras * full_adapter_bytes(model_config, max_lora_rank)
        self.registry = AdapterRegistry(model_config, max_lora_rank=max_lora_rank,
                                        max_count=max_cpu_loras, max_bytes=max_cpu_lora_bytes,
                                        served=served, served_path=served_path)
        self.reader = self.registry.read
        self.loader = AdapterLoader(lambda req: self._prepare(self.reader(req)),
                                    max_workers=load_workers)
        self.counters = AdapterCounters()
        self._failures: OrderedDict[int, BaseException] = OrderedDict()

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

    # Explicit calls: they read at once ---------------------------------------------------------

    def read(self, req: LoRARequest) -> ReadWeights:
        """Read and validate req's adapter from its path, changing nothing (any thread: the
        server reads here off the engine thread, then hands the weights to add or reload)."""
        self._require_lora(req)
        start = time.perf_counter()
        adapter = self._prepare(self.reader(req))
        return ReadWeights(adapter, time.perf_counter() - start)

    def _prepare(self, adapter: LoRAAdapter) -> LoRAAdapter:
        """Packed for the slots while still off the engine thread."""
        return self.slots.prepare(adapter) if self.slots is not None else adapter

    def add(self, req: LoRARequest, adapter: LoRAAdapter | None = None, *,
            read: ReadWeights | None = None) -> LoRAAdapter:
        """Load (or take the given in-memory) adapter into the CPU tier; reuse it when known.
        `read`: weights `read` already took from req's path (evictable, as they can be read
        again). New weights under an id already in a slot replace it there, compiling
        nothing."""
        self._require_lora(req)
        if adapter is not None:
            if self.registry.put_in_memory(req, adapter) and self.slots is not None:
                self.slots.reload(req.lora_int_id, adapter)
            self._trim()
            return adapter
        if not self.registry.register(req):
            if read is None:
                self._read_now(req)
            else:
                self.loader.cancel(req.lora_int_id)
                self.registry.store(req, read.adapter)
                self.counters.loaded(req.lora_int_id, read.seconds, True)
                self._trim(protected={req.lora_int_id})
        return self.registry.adapter(req.lora_int_id)

    def _read_now(self, req: LoRARequest) -> None:
        self.loader.cancel(req.lora_int_id)  # a background load of the same files
        try:
            adapter = self.counters.timed_read(self.reader, req)
        except BaseException:
            if self.slots.slot_of(req.lora_int_id) is None:
                self.registry.remove(req.lora_int_id)
            raise
        self.registry.store(req, adapter)
        self._trim(protected={req.lora_int_id})

    def reload(self, req: LoRARequest, *, read: ReadWeights | None = None) -> LoRAAdapter:
        """Load req's adapter from its path again under its id (vLLM's load_inplace): new
        weights (`read`, or read now) replace the old in the CPU tier and in its slot,
        compiling nothing; cached prefixes of the old weights are never reused."""
        self._require_lora(req)
        self.loader.cancel(req.lora_int_id)
        adapter = self.registry.reload(req, None if read is None else read.adapter)
        self.slots.reload(req.lora_int_id, adapter)
        self._trim(protected={req.lora_int_id})
        return adapter

    def remove(self, lora_id: int) -> bool:
        if lora_id in self.scheduler.adapters_in_use():
            raise ValueError(f"adapter {lora_id} is used by running requests; remove it later")
        self.scheduler.unpin(lora_id)
        self.loader.cancel(lora_id)
        if self.slots is not None:
            self.slots.evict(lora_id)
        self.counters.forget(lora_id)
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
        if self.slots.slot_of(lora_id) is None and not self.registry.is_cached(lora_id):
            self._read_now(self.registry.request(lora_id))
        self._fill({lora_id}, keep=held)
        self.scheduler.pin(lora_id)
        return True

    def identity(self, lora_id: int) -> tuple[int, int]:
        """(id, version) of a registered adapter: the version changes whenever new weights
        take the id, so KV cached under old weights is never reused."""
        return lora_id, self.registry.version(lora_id)

    # Requests: loads in the background ---------------------------------------------------------

    def request(self, req: LoRARequest) -> None:
        """Register a request's adapter (checks only, no reads): `update` loads it if needed."""
        self._require_lora(req)
        self.registry.register(req)

    def ready(self, lora_id: int) -> bool:
        """Whether a request of this adapter can run now: its weights are in a slot or in the
        CPU tier."""
        return self.registry.is_cached(lora_id) or (
            self.slots is not None and self.slots.slot_of(lora_id) is not None)

    def loading(self) -> set[int]:
        return self.loader.loading()

    def wait_for_load(self, timeout: float) -> None:
        self.loader.wait_any(timeout)

    def update(self, waiting: list[int]) -> dict[int, BaseException]:
        """Between steps: keep the loads that finished, then start loads for the adapters of
        the waiting requests (`waiting`, oldest first) that fit in the CPU tier -> the
        adapters whose load failed (or that were removed), with the error: their requests
        fail, nothing else does."""
        if self.slots is None:
            return {}
        failed: dict[int, BaseException] = {}
        for result in self.loader.collect():
            self.counters.loaded(result.lora_id, result.seconds, result.error is None)
            if result.error is None:
                self.registry.store(result.request, result.value)
            else:
                failed[result.lora_id] = self._failed(result.lora_id, result.error)
        window = self._window(waiting)
        for lora_id in window:
            if lora_id in failed:
                continue
            if lora_id not in self.registry:
                failed[lora_id] = ValueError(f"adapter {lora_id} was removed while requests "
                                             "waited for it")
            elif not self.ready(lora_id):
                self._failures.pop(lora_id, None)
                self.loader.submit(self.registry.request(lora_id))
        self._trim(protected=set(window))
        return failed

    def _failed(self, lora_id: int, error: BaseException) -> BaseException:
        """Remember why a load failed, and forget the adapter (the next request registers
        it again and retries)."""
        self._failures[lora_id] = error
        while len(self._failures) > MAX_REMEMBERED_FAILURES:
            self._failures.popitem(last=False)
        if self.slots.slot_of(lora_id) is None:
            self.registry.remove(lora_id)
        return error

    def _window(self, waiting: list[int]) -> list[int]:
        """The waiting requests' adapters that need their weights on the host, oldest first,
        as many as the CPU tier holds (its byte bound counted with the weights there)."""
        cache = self.registry.cache
        window, size = [], 0
        for lora_id in dict.fromkeys(waiting):
            if self.slots.slot_of(lora_id) is not None:
                continue
            if len(window) >= cache.max_count or (
                    cache.max_bytes is not None and size >= cache.max_bytes):
                break
            window.append(lora_id)
            size += cache.size(lora_id)
        return window

    def load_error(self, lora_id: int) -> BaseException | None:
        """Why the last load of this adapter failed (None if it did not)."""
        return self._failures.get(lora_id)

    def _trim(self, protected: set[int] = frozenset()) -> None:
        for lora_id in self.registry.trim(protected):
            self.counters.evicted(lora_id, "cpu")

    # Slots -------------------------------------------------------------------------------------

    def activate(self, batch: Batch):
        """A slot for every adapter of the batch, evicting none that a running sequence or a
        pin holds -> the LoRA sites those adapters use, for the step to skip the others (None
        without LoRA)."""
        if self.slots is None:
            return None
        ids = batch.adapters()
        self._fill(ids, keep=self.scheduler.held_adapters())
        return self.slots.sites(ids)

    def _fill(self, ids: set[int], keep: set[int]) -> None:
        """Slots for `ids` (each in a slot or the CPU tier): one device update per new one."""
        before = set(self.slots.loaded())
        self.slots.activate({i: None if self.slots.slot_of(i) is not None
                             else self.registry.adapter(i) for i in ids}, keep=keep)
        for lora_id in before - set(self.slots.loaded()):
            self.counters.evicted(lora_id, "slot")

    def slot_of(self, lora_id: int | None) -> int:
        """The slot of an adapter activated for this step; -1 for the base model."""
        return self.slots.slot_of(lora_id) if lora_id is not None else -1

    # Facts --------------------------------------------------------------------------------------

    def stats(self, waiting: list) -> dict:
        """EngineStats' adapter fields; waiting: the scheduler's waiting sequences."""
        counters, loading = self.counters, self.loading()
        slotted = set(self.slots.loaded()) if self.slots is not None else set()
        cached = set(self.registry.cache.ids())
        wanted = Counter(s.adapter for s in {s.request.request_id: s for s in waiting
                                             if s.adapter is not None}.values())
        waiting_load = sum(n for i, n in wanted.items() if not self.ready(i))
        tiers = {i: "slot" if i in slotted else "cpu" if i in cached else "loading"
                 for i in slotted | cached | loading}
        known = self.registry.ids()
        per_adapter = [AdapterStat(
            i, self.registry.request(i).lora_name if i in known else str(i), tier,
            counters.loads[i], counters.evictions["cpu"][i] + counters.evictions["slot"][i],
            wanted[i]) for i, tier in sorted(tiers.items())]
        by_tier = Counter(tiers.values())
        return {"adapter_loads": counters.total_loads,
                "adapter_load_failures": counters.total_failures,
                "adapter_evictions": dict(counters.total_evictions),
                "adapter_load_seconds": counters.load_seconds.buckets(),
                "adapter_load_seconds_sum": counters.load_seconds.total,
                "requests_waiting_on_load": waiting_load,
                "adapters_by_tier": {"disk": len(known - set(tiers)), "cpu": by_tier["cpu"],
                                     "slot": by_tier["slot"], "loading": by_tier["loading"]},
                "adapters": per_adapter}

    def shutdown(self) -> None:
        self.loader.shutdown()
