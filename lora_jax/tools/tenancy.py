"""Many tenants in the serving benchmark: adapters on disk (through the CPU tier), per-tenant
latency (hot tenants against cold ones), and the same requests on one adapter beside them.
"""

from collections import Counter
from pathlib import Path

import numpy as np

from lora_jax.lora.adapters import save_adapter
from lora_jax.request import LoRARequest
from lora_jax.tools.workload import random_adapter
from models import LlamaConfig

# The hot tenants: the adapters of the top tenth by request count (at least one adapter).
HOT_FRACTION = 0.1


def ensure_disk_adapters(folder: Path, config: LlamaConfig, num: int, rank: int,
                         targets: tuple[str, ...]) -> list[str]:
    """num random adapters as PEFT folders under `folder` (written once) -> their paths."""
    paths = []
    for i in range(num):
        path = folder / f"bench-{i}"
        if not (path / "adapter_config.json").is_file():
            save_adapter(random_adapter(config, rank, seed=i, targets=targets), path)
        paths.append(str(path))
    return paths


def _ms(values: list[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(values, q)), 2) if values else None


def _latency(ttft: list[float], itl: list[float], requests: int) -> dict:
    return {"requests": requests, "ttft_ms_mean": round(1e3 * float(np.mean(ttft)), 2)
            if ttft else None, "ttft_ms_p50": _ms(ttft, 50), "ttft_ms_p99": _ms(ttft, 99),
            "itl_ms_p50": _ms(itl, 50), "itl_ms_p99": _ms(itl, 99)}


def tenant_latency(times: dict[str, list[float]], start: float,
                   loras: list[LoRARequest | None]) -> dict:
    """Per-tenant TTFT and inter-token latency -> hot tenants (the top tenth of adapters by
    request count) against the cold rest, and the tenants' count. times: each request's
    (bench-{i}) token arrival times; every request arrived at `start`."""
    counts = Counter(lr.lora_int_id if lr else None for lr in loras)
    ranked = [tenant for tenant, _ in counts.most_common()]
    hot = set(ranked[:max(1, round(HOT_FRACTION * len(ranked)))])
    groups: dict[str, tuple[list, list, list]] = {"hot": ([], [], []), "cold": ([], [], [])}
    for i, lr in enumerate(loras):
        stamps = times.get(f"bench-{i}", [])
        ttft, itl, seen = groups["hot" if (lr.lora_int_id if lr else None) in hot else "cold"]
        seen.append(i)
        if stamps:
            ttft.append(stamps[0] - start)
            itl.extend(np.diff(stamps).tolist())
    return {"tenants": len(ranked), "hot_tenants": len(hot),
            **{name: _latency(ttft, itl, len(seen)) for name, (ttft, itl, seen) in
               groups.items()}}


def one_adapter(loras: list[LoRARequest | None]) -> list[LoRARequest | None]:
    """The same requests, every adapter request on the most requested adapter."""
    counts = Counter(lr.lora_int_id for lr in loras if lr is not None)
    if not counts:
        return list(loras)
    top = counts.most_common(1)[0][0]
    chosen = next(lr for lr in loras if lr is not None and lr.lora_int_id == top)
    return [None if lr is None else chosen for lr in loras]
