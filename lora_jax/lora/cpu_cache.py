"""The CPU tier of adapters: loaded weights kept in host memory, bounded by count and bytes,
least recently used first out. Adapters the caller protects (in a device slot, pinned, wanted
by a waiting request) are never evicted, so the cache may stay above its bounds while they
hold it; adapters without a path to reload them from (handed over in memory) are never
evicted either."""

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class CpuAdapterCache:
    def __init__(self, max_count: int, max_bytes: int | None = None,
                 size_of: Callable[[Any], int] = lambda _: 0):
        if max_count < 1:
            raise ValueError(f"max_cpu_loras must be at least 1, got {max_count}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_cpu_lora_bytes must be positive, got {max_bytes}")
        self.max_count, self.max_bytes, self._size_of = max_count, max_bytes, size_of
        self._items: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self._sticky: set[int] = set()
        self.num_bytes = 0
        self.num_evictions = 0

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[int]:
        return list(self._items)

    def get(self, lora_id: int) -> Any:
        """The adapter (now the most recently used); KeyError if absent."""
        self._items.move_to_end(lora_id)
        return self._items[lora_id][0]

    def put(self, lora_id: int, adapter: Any, *, sticky: bool = False) -> None:
        """Keep adapter under lora_id (replacing what it held); sticky ones are never evicted."""
        self.remove(lora_id)
        size = int(self._size_of(adapter))
        self._items[lora_id] = (adapter, size)
        self.num_bytes += size
        if sticky:
            self._sticky.add(lora_id)

    def remove(self, lora_id: int) -> bool:
        entry = self._items.pop(lora_id, None)
        self._sticky.discard(lora_id)
        if entry is None:
            return False
        self.num_bytes -= entry[1]
        return True

    def over(self) -> bool:
        return len(self._items) > self.max_count or (
            self.max_bytes is not None and self.num_bytes > self.max_bytes)

    def fits(self, size: int) -> bool:
        """Whether one more adapter of `size` bytes fits without evicting anything."""
        return len(self._items) < self.max_count and (
            self.max_bytes is None or self.num_bytes + size <= self.max_bytes)

    def trim(self, protected: set[int]) -> list[int]:
        """Evict least recently used adapters while over a bound -> the evicted ids."""
        keep = protected | self._sticky
        evicted = []
        while self.over():
            victim = next((i for i in self._items if i not in keep), None)
            if victim is None:
                break
            self.remove(victim)
            evicted.append(victim)
        self.num_evictions += len(evicted)
        return evicted

    def size(self, lora_id: int) -> int:
        """Bytes of an adapter held here (0 if absent)."""
        entry = self._items.get(lora_id)
        return 0 if entry is None else entry[1]
