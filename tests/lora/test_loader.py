"""The background adapter loader and the CPU tier's bounds."""

import threading
import time

import pytest

from lora_jax.lora.cpu_cache import CpuAdapterCache
from lora_jax.lora.loader import AdapterLoader
from lora_jax.request import LoRARequest


def _req(i: int) -> LoRARequest:
    return LoRARequest(f"a{i}", i, f"/adapters/{i}")


def test_a_load_runs_off_the_calling_thread_and_is_collected_once_done():
    gate, threads = threading.Event(), []

    def load(req):
        threads.append(threading.current_thread().name)
        gate.wait(10)
        return req.lora_name.upper()

    loader = AdapterLoader(load)
    loader.submit(_req(1))
    loader.submit(_req(1))  # joins the load under way
    assert loader.collect() == [] and loader.loading() == {1}
    gate.set()
    result = loader.wait(1)
    assert (result.lora_id, result.value, result.error) == (1, "A1", None)
    assert result.seconds >= 0 and threads == ["lora-load_0"]
    assert loader.loading() == set() and loader.collect() == []
    loader.shutdown()


def test_a_failed_load_reports_its_error_and_others_still_load():
    def load(req):
        if req.lora_int_id == 2:
            raise FileNotFoundError("no adapter_config.json")
        return req.lora_int_id

    loader = AdapterLoader(load)
    for i in (1, 2, 3):
        loader.submit(_req(i))
    deadline, results = time.monotonic() + 10, []
    while len(results) < 3 and time.monotonic() < deadline:
        results += loader.collect()
        time.sleep(0.01)
    by_id = {r.lora_id: r for r in results}
    assert sorted(by_id) == [1, 2, 3]
    assert by_id[1].value == 1 and by_id[3].value == 3
    assert isinstance(by_id[2].error, FileNotFoundError) and by_id[2].value is None
    loader.shutdown()


def test_cpu_cache_is_bounded_by_count_and_by_bytes_least_recently_used_first():
    cache = CpuAdapterCache(max_count=3, max_bytes=250, size_of=len)
    for i in (1, 2, 3):
        cache.put(i, b"x" * 100)  # 300 bytes: over the byte bound
    cache.get(1)
    assert cache.trim(protected=set()) == [2] and cache.num_bytes == 200
    cache.put(4, b"x" * 10)
    cache.put(5, b"x" * 10)  # 4 adapters: over the count bound
    assert cache.trim(protected={3}) == [1] and cache.ids() == [3, 4, 5]
    assert cache.num_evictions == 2


def test_cpu_cache_never_evicts_protected_or_sticky_adapters():
    cache = CpuAdapterCache(max_count=1)
    cache.put(1, "in memory", sticky=True)
    cache.put(2, "in a slot")
    assert cache.trim(protected={2}) == [] and len(cache) == 2
    cache.remove(1)
    assert cache.trim(protected={2}) == [] and cache.ids() == [2]


def test_cpu_cache_bounds_must_be_positive():
    with pytest.raises(ValueError, match="max_cpu_loras must be at least 1"):
        CpuAdapterCache(max_count=0)
