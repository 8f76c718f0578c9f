"""Memory at start-up: host RSS (now and peak) and the bytes each device holds.

Peak RSS is the kernel's high-water mark (VmHWM), reset when loading starts (writing 5 to
/proc/self/clear_refs), so the load's peak is its own and not an earlier one's. Device bytes
are the shards of this process's live jax arrays, counted per device: the same figure on
every backend (on CPU devices it is host memory too).
"""

import logging
import resource
from collections import Counter
from dataclasses import dataclass

import jax

logger = logging.getLogger("lora_jax")

_MIB = 1 << 20


def _status(field: str) -> int | None:
    """A field of /proc/self/status in bytes, or None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """The high-water mark of RSS since the process began or since reset_peak_rss."""
    peak = _status("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _buffers(array: jax.Array) -> list[tuple[int, int, int]]:
    """(device id, buffer address, bytes) of each shard this process holds."""
    return [(s.device.id, s.data.unsafe_buffer_pointer(), s.data.nbytes)
            for s in array.addressable_shards]


def _live() -> list[jax.Array]:
    """Live arrays, each buffer once: a shard read as an array of its own (Shard.data, the
    pieces jax.make_array_from_callback assembles) shares its buffer with the whole array."""
    arrays = [a for a in jax.live_arrays() if not a.is_deleted()]
    arrays.sort(key=lambda a: -len(a.sharding.device_set))  # whole arrays before their pieces
    seen, out = set(), []
    for array in arrays:
        keys = {(device, address) for device, address, _ in _buffers(array)}
        if not keys & seen:
            out.append(array)
        seen |= keys
    return out


def device_bytes() -> dict[int, int]:
    """Device id -> bytes of the live jax arrays' shards it holds (this process's devices)."""
    held: Counter = Counter({d.id: 0 for d in jax.local_devices()})
    for array in _live():
        for device, _, nbytes in _buffers(array):
            held[device] += nbytes
    return dict(held)


@dataclass(frozen=True)
class MemoryReport:
    """Host and device memory while the weights loaded and once start-up finished."""

    rss_before_load: int | None
    peak_rss_load: int
    device_bytes_loaded: dict[int, int]
    peak_rss_start: int
    rss_started: int | None
    device_bytes_started: dict[int, int]

    def stats(self) -> dict:
        return {"host_rss_before_load_bytes": self.rss_before_load,
                "host_peak_rss_load_bytes": self.peak_rss_load,
                "host_peak_rss_start_bytes": self.peak_rss_start,
                "host_rss_started_bytes": self.rss_started,
                "device_bytes_loaded": dict(self.device_bytes_loaded),
                "device_bytes_started": dict(self.device_bytes_started)}


class LoadMemory:
    """Create before loading the weights, call `loaded()` after them and `started()` once
    start-up is done: the report, also written to the "lora_jax" log."""

    def __init__(self):
        self.rss_before = rss_bytes()
        reset_peak_rss()

    def loaded(self) -> None:
        self.peak_load, self.device_loaded = peak_rss_bytes(), device_bytes()

    def started(self) -> MemoryReport:
        report = MemoryReport(self.rss_before, self.peak_load, self.device_loaded,
                              peak_rss_bytes(), rss_bytes(), device_bytes())
        logger.info("memory: host RSS %s MiB before loading, peak %.0f MiB while loading, "
                    "peak %.0f MiB through start-up; device MiB after loading %s, after "
                    "start-up %s", _mib(report.rss_before_load), report.peak_rss_load / _MIB,
                    report.peak_rss_start / _MIB, _per_device(report.device_bytes_loaded),
                    _per_device(report.device_bytes_started))
        return report


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / _MIB:.0f}"


def _per_device(held: dict[int, int]) -> str:
    return "{" + ", ".join(f"{d}: {b / _MIB:.1f}" for d, b in sorted(held.items())) + "}"


def whole_arrays(named: dict, min_elements: int) -> list[dict]:
    """This process's live arrays of at least `min_elements` that some device holds whole
    (one device's, or replicated): name (a path into `named`'s trees, or None for an array
    none of them holds), shape and the number of devices holding a copy."""
    names = {}
    for root, tree in named.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.Array):
                names[id(leaf)] = root + jax.tree_util.keystr(path)
    found = []
    for array in _live():
        if array.size < min_elements:
            continue
        if any(s.data.shape == array.shape for s in array.addressable_shards):
            found.append({"name": names.get(id(array)), "shape": list(array.shape),
                          "devices": len(array.sharding.device_set)})
    return sorted(found, key=lambda f: (f["name"] or "", f["shape"]))
