"""EngineConfig: how an LLM serves, validated once at the edge."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters whose weights stay in host memory
    # Their bytes at most (default: max_cpu_loras adapters of max_lora_rank on every projection)
    max_cpu_lora_bytes: int | None = None
    max_num_seqs: int = 256  # vLLM's LLM default
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 256
    max_prefill_seqs: int = 16  # multi-token chunks (prefills, recomputes) per step
    seed: int = 0
    lora_backend: str | None = None
    attention_backend: str | None = None  # None: the Pallas kernel on GPU, plain XLA elsewhere
    block_size: int = 16
    num_kv_blocks: int | None = None  # the pool's size in blocks (tests); else from the bytes
    kv_cache_memory_bytes: int | None = None  # default: min(4 GiB, max_num_seqs full rows)
    enable_prefix_caching: bool = True
    # Overlap host and device: the next step is scheduled and dispatched before the host
    # reads the previous step's tokens (vLLM's async scheduling). LLMEngine.step() then
    # reports each step's outputs one call later.
    async_scheduling: bool = True
    # Compile every program before serving (default: on, unless $LORA_JAX_COMPILE_ON_START=0).
    compile_on_start: bool | None = None
    # JAX's persistent compilation cache: None = ~/.cache/lora-jax/xla (or
    # $LORA_JAX_COMPILATION_CACHE_DIR when set), "" = off.
    compilation_cache_dir: str | None = None
    # Split the model over this many devices (a "tp" mesh axis; see models.sharding).
    tensor_parallel_size: int = 1
    # Several processes (hosts) on one mesh: jax.distributed's coordinator (process 0's
    # HOST:PORT), the number of processes and this one's index (see lora_jax.worker.distributed).
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_num_seqs", "max_num_batched_tokens",
                     "max_prefill_chunk", "max_prefill_seqs", "block_size",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_cpu_loras", "max_cpu_lora_bytes", "max_model_len", "num_kv_blocks",
                     "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras "
                             f"({self.max_loras})")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("enable_prefix_caching", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.max_prefill_chunk & (self.max_prefill_chunk - 1):
            raise ValueError(f"max_prefill_chunk must be a power of two (it is a shape bucket), "
                             f"got {self.max_prefill_chunk}")
        if self.compile_on_start not in (None, True, False):
            raise ValueError(f"compile_on_start must be True or False, got "
                             f"{self.compile_on_start!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")

    def distributed(self):
        """The lora_jax.worker.distributed.Distributed of this config, or None (one process)."""
        if self.num_processes == 1 and self.coordinator_address is None:
            return None
        from lora_jax.worker.distributed import Distributed

        return Distributed(self.coordinator_address, self.num_processes, self.process_id)

    def should_compile_on_start(self) -> bool:
        if self.compile_on_start is not None:
            return self.compile_on_start
        return os.environ.get("LORA_JAX_COMPILE_ON_START", "1") not in ("0", "false", "no")

    def cache_dir(self) -> str | None:
        if self.compilation_cache_dir is not None:
            return self.compilation_cache_dir
        return os.environ.get("LORA_JAX_COMPILATION_CACHE_DIR")
