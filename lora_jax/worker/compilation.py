"""Every program the engine runs, compiled before the first request.

The set is small and fixed (see Runner.program_keys): one program per token bucket (powers of
two from 8 to max_num_batched_tokens), plus the slot-fill update of the adapter stacks. The
sampling kind (greedy or general) and the top logprobs are flags inside each program. Context
lengths, adapters, ranks, long-context scaling and batch mix are all arguments, never shapes,
so after start-up no workload compiles anything. Compiled, each program then runs once per branch
a step can take (lora_jax/worker/warm.py), so no request's step pays for a first run either.

JAX's persistent compilation cache (under ~/.cache/lora-jax/xla, or $XDG_CACHE_HOME/lora-jax/
xla) keeps the compiled programs on disk, so the next start with the same model shapes loads
them instead of compiling.
"""

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import jax

from lora_jax.progress import progress_bar

logger = logging.getLogger("lora_jax")

_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-jax" / "xla"


def enable_persistent_cache(path: str | Path | None) -> Path | None:
    """Turn on JAX's persistent compilation cache at `path` (None: the default folder; "":
    off; and off for a CPU mesh over several processes). A cache folder the user already gave
    JAX wins; returns the folder in use."""
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # A CPU program over several processes that comes back from the cache runs collectives
        # that do not match the other processes' (gloo aborts the process: "Received data size
        # doesn't match expected size"), even in a folder of its own: compile those afresh.
        logger.info("persistent compilation cache off: %d CPU processes share the mesh",
                    jax.process_count())
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if path == "":
        return None
    folder = Path(path) if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Small models compile in well under JAX's default one second: cache them too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


@dataclass(frozen=True)
class CompileReport:
    """What start-up compiled: programs, seconds, and how many came from the disk cache."""

    num_programs: int
    seconds: float
    cache_hits: int
    cache_dir: str | None
    warm_runs: int = 0  # programs run once per branch before serving (Runner.warm)
    warm_seconds: float = 0.0


def compile_all(runner, stacks, slots=None, *, show_progress: bool = True,
                cache_dir: Path | None = None) -> CompileReport:
    """Compile every program of `runner` (and the slot fill of `slots`) before serving, then
    run each once per branch (Runner.warm)."""
    hits = []

    def listener(name, **_kwargs):
        if name == _CACHE_HIT:
            hits.append(name)

    jax.monitoring.register_event_listener(listener)
    start = time.perf_counter()
    try:
        keys = runner.program_keys()
        # XLA compiles outside the GIL: one thread per core compiles that many programs at once.
        with ThreadPoolExecutor(max(1, min(len(keys), os.cpu_count() or 1))) as pool, progress_bar(
                total=len(keys), desc="compiling", unit="program",
                disable=not show_progress or len(keys) < 2) as bar:
            for future in as_completed([pool.submit(runner.compile, key, stacks)
                                        for key in keys]):
                future.result()
                bar.update(1)
        runner.order_programs(keys)
        if slots is not None:
            slots.warm()  # the fill donates the stacks: read them anew
            stacks = slots.stacks
        compiled = time.perf_counter()
        # Several processes run each step together, announced by process 0 (warm runs are not).
        runs = sum(runner.warm(key, stacks) for key in keys) if runner.channel is None else 0
    finally:
        jax.monitoring.unregister_event_listener(listener)
    report = CompileReport(len(keys), compiled - start, len(hits),
                           None if cache_dir is None else str(cache_dir), runs,
                           time.perf_counter() - compiled)
    runner.compiled_at_start = len(runner.compiled_programs())
    logger.info("compiled %d programs in %.1f s (%d from the persistent cache%s), then %d warm "
                "runs in %.1f s", report.num_programs, report.seconds, report.cache_hits,
                f" at {cache_dir}" if cache_dir else ", which is off", runs,
                report.warm_seconds)
    return report
