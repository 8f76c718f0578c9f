"""What generate returns, shaped like vLLM's RequestOutput / CompletionOutput."""

from dataclasses import dataclass, field

from lora_jax.request import LoRARequest


@dataclass
class CompletionOutput:
    """One generated sequence. finish_reason: "stop", "length", "error", or None while running."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter) of a request's life, as vLLM reports them."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """All sequences of one prompt. `error` is set, and outputs empty, when the request failed."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None


@dataclass(frozen=True)
class AdapterStat:
    """One adapter off the disk tier: where it is and what happened to it."""

    lora_int_id: int
    name: str
    tier: str  # "slot" (on the device), "cpu" (weights in host memory), "loading"
    loads: int  # reads from disk that succeeded
    evictions: int  # times it left a slot or the CPU tier
    waiting_requests: int  # requests waiting for it (to load, or for a slot)


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters and gauges at one moment (for metrics and benchmarks)."""

    num_running: int  # sequences running
    num_waiting: int  # sequences waiting to start
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int  # prompt blocks looked up in the prefix cache
    prefix_cache_hits: int  # of those, found cached
    num_preemptions: int  # sequences preempted (recomputed later)
    running_adapters: list[int]  # lora_int_ids of running sequences
    waiting_adapters: list[int]  # lora_int_ids of waiting sequences
    max_loras: int
    adapter_slot_loads: int  # adapters written into a device slot (swaps in and reloads)
    adapter_loads: int = 0  # adapters read from disk (in the background or on add_lora)
    adapter_load_failures: int = 0
    adapter_evictions: dict[str, int] = field(default_factory=dict)  # by tier: "cpu", "slot"
    # Seconds of the loads: [(upper bound, loads at or below it)] ending with "+Inf", and sum.
    adapter_load_seconds: list[tuple[str, int]] = field(default_factory=list)
    adapter_load_seconds_sum: float = 0.0
    requests_waiting_on_load: int = 0
    adapters_by_tier: dict[str, int] = field(default_factory=dict)  # disk, cpu, slot, loading
    # The adapters in a slot, in host memory or loading (never the disk-only ones: bounded).
    adapters: list[AdapterStat] = field(default_factory=list)
    # Start-up memory (lora_jax.worker.memory.MemoryReport.stats): host RSS before loading and
    # its peaks while loading and through start-up, bytes per device after each, in bytes.
    memory: dict = field(default_factory=dict)
