"""What happened to adapters: loads (with their seconds), failed loads and evictions, per
adapter and in total. Plain counters read by the engine's stats(); a removed adapter's
counters go with it, so their number stays bounded by the adapters known."""

import time
from collections import Counter
from dataclasses import dataclass, field

# Upper bounds (seconds) of the load-time histogram's buckets; the last one is +Inf.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LoadHistogram:
    """Load seconds in fixed buckets (cumulative counts, as Prometheus reads them)."""

    bounds: tuple[float, ...] = LOAD_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """[(upper bound as text, observations at or below it)], ending with +Inf."""
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class AdapterCounters:
    def __init__(self):
        self.loads: Counter[int] = Counter()  # reads from disk that succeeded, per adapter
        self.failures: Counter[int] = Counter()
        self.evictions: dict[str, Counter[int]] = {"cpu": Counter(), "slot": Counter()}
        self.total_loads = self.total_failures = 0
        self.total_evictions = {"cpu": 0, "slot": 0}
        self.load_seconds = LoadHistogram()

    def timed_read(self, read, req):
        """read(req), counted as a load of req's adapter (a failure raises as it was)."""
        start = time.perf_counter()
        try:
            adapter = read(req)
        except BaseException:
            self.loaded(req.lora_int_id, time.perf_counter() - start, False)
            raise
        self.loaded(req.lora_int_id, time.perf_counter() - start, True)
        return adapter

    def loaded(self, lora_id: int, seconds: float, ok: bool) -> None:
        if ok:
            self.loads[lora_id] += 1
            self.total_loads += 1
            self.load_seconds.observe(seconds)
        else:
            self.failures[lora_id] += 1
            self.total_failures += 1

    def evicted(self, lora_id: int, tier: str) -> None:
        self.evictions[tier][lora_id] += 1
        self.total_evictions[tier] += 1

    def forget(self, lora_id: int) -> None:
        """The adapter was removed: its own counters go (the totals stay)."""
        for counts in (self.loads, self.failures, *self.evictions.values()):
            counts.pop(lora_id, None)
