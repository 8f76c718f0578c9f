"""The host tiers of adapters: known adapters (disk) and loaded weights (CPU), LRU within
the bounds, protected and in-memory adapters kept, versions that follow the weights."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from helpers.peft import TinyShapes, make_adapter

from lora_jax.lora.adapters import HostPacked, load_adapter
from lora_jax.lora.registry import AdapterRegistry, adapter_bytes
from lora_jax.request import LoRARequest

SHAPES = TinyShapes()


def _registry(max_count: int, max_bytes: int | None = None) -> AdapterRegistry:
    return AdapterRegistry(SHAPES, max_lora_rank=8, max_count=max_count, max_bytes=max_bytes,
                           served="tiny-llama", served_path=Path("/models/tiny-llama"))


def _requests(tmp_path, n: int) -> list[LoRARequest]:
    return [LoRARequest(f"a{i}", i + 1, str(make_adapter(tmp_path / f"a{i}", seed=i)))
            for i in range(n)]


def _load(registry: AdapterRegistry, req: LoRARequest) -> None:
    if not registry.register(req):
        registry.store(req, registry.read(req))
    registry.adapter(req.lora_int_id)  # used: now the most recently used


def test_adapters_beyond_the_count_bound_are_evicted_least_recently_used_first(tmp_path):
    registry = _registry(max_count=2)
    a, b, c = _requests(tmp_path, 3)
    for req in (a, b, a, c):
        _load(registry, req)
    assert registry.trim(protected=set()) == [b.lora_int_id]
    assert {i for i in registry.ids() if registry.is_cached(i)} == {a.lora_int_id,
                                                                     c.lora_int_id}
    assert registry.ids() == {a.lora_int_id, b.lora_int_id, c.lora_int_id}  # all still known


def test_adapters_beyond_the_byte_bound_are_evicted(tmp_path):
    a, b = _requests(tmp_path, 2)
    size = adapter_bytes(_registry(4).read(a))
    registry = _registry(max_count=4, max_bytes=size + size // 2)
    _load(registry, a)
    _load(registry, b)
    assert registry.trim(protected=set()) == [a.lora_int_id]
    assert registry.cache.num_bytes == adapter_bytes(registry.adapter(b.lora_int_id))


def test_protected_and_in_memory_adapters_outlive_the_bounds(tmp_path):
    registry = _registry(max_count=1)
    a, b, c = _requests(tmp_path, 3)
    memory = LoRARequest("mem", 9, "memory://mem")
    registry.put_in_memory(memory, load_adapter(a.lora_path, base=SHAPES, max_lora_rank=8))
    for req in (a, b, c):
        _load(registry, req)
    registry.trim(protected={a.lora_int_id})
    assert {i for i in registry.ids() if registry.is_cached(i)} == {memory.lora_int_id,
                                                                     a.lora_int_id}


def test_registering_reads_nothing_and_a_known_adapter_is_read_once(tmp_path):
    registry = _registry(max_count=4)
    (a,) = _requests(tmp_path, 1)
    assert registry.register(a) is False and not registry.is_cached(a.lora_int_id)
    registry.store(a, registry.read(a))
    first = registry.adapter(a.lora_int_id)
    assert registry.register(a) is True and registry.adapter(a.lora_int_id) is first


def test_new_weights_change_the_version_and_a_reread_keeps_it(tmp_path):
    registry = _registry(max_count=4)
    (a,) = _requests(tmp_path, 1)
    _load(registry, a)
    version = registry.version(a.lora_int_id)
    registry.cache.remove(a.lora_int_id)  # evicted, then read again from the same files
    _load(registry, a)
    assert registry.version(a.lora_int_id) == version
    weights = load_adapter(str(make_adapter(tmp_path / "other", seed=7)), base=SHAPES,
                           max_lora_rank=8)
    assert registry.put_in_memory(a, weights)  # replaces the weights known under the id
    assert registry.adapter(a.lora_int_id) is weights
    assert registry.version(a.lora_int_id) > version
    after_memory = registry.version(a.lora_int_id)
    registry.reload(a)
    assert registry.version(a.lora_int_id) > after_memory


def test_weights_read_for_a_removed_adapter_are_not_kept(tmp_path):
    registry = _registry(max_count=4)
    (a,) = _requests(tmp_path, 1)
    registry.register(a)
    weights = registry.read(a)
    registry.remove(a.lora_int_id)
    assert not registry.store(a, weights) and not registry.is_cached(a.lora_int_id)


def test_an_id_registered_for_another_path_is_rejected_naming_both(tmp_path):
    registry = _registry(max_count=4)
    a, b = _requests(tmp_path, 2)
    registry.register(a)
    with pytest.raises(ValueError, match="already registered") as err:
        registry.register(LoRARequest("b", a.lora_int_id, b.lora_path))
    assert a.lora_path in str(err.value) and b.lora_path in str(err.value)


@pytest.mark.parametrize("name,ok", [("tiny-llama", True), ("/models/tiny-llama", True),
                                     ("org/tiny-llama", True), ("other-model", False)])
def test_base_model_name_must_name_the_served_model(tmp_path, name, ok):
    registry = _registry(max_count=4)
    path = str(make_adapter(tmp_path / "a"))
    req = LoRARequest("a", 1, path, base_model_name=name)
    if ok:
        registry.register(req)
    else:
        with pytest.raises(ValueError, match="other-model"):
            registry.register(req)


def test_in_memory_weights_that_do_not_fit_the_base_are_rejected_naming_the_adapter(tmp_path):
    registry = _registry(max_count=4)
    big = load_adapter(str(make_adapter(tmp_path / "big", r=16)), base=SHAPES, max_lora_rank=16)
    with pytest.raises(ValueError, match="'big'.*rank 16 above max_rank 8"):
        registry.put_in_memory(LoRARequest("big", 1, "memory://big"), big)


def test_an_adapter_packed_for_the_slots_counts_both_copies_against_the_byte_bound(tmp_path):
    """The loader packs adapters into the slots' layout (AdapterSlots.prepare) and the CPU
    tier keeps both: the byte bound must see both."""
    (a,) = _requests(tmp_path, 1)
    plain = _registry(4).read(a)
    packed = {"qkv_a": np.ones((2, 64, 24), np.float32), "q_b": np.ones((2, 8, 64), np.float32)}
    prepared = dataclasses.replace(plain, packed=HostPacked(8, "float32", packed))
    assert adapter_bytes(prepared) == adapter_bytes(plain) + (2 * 64 * 24 + 2 * 8 * 64) * 4
    registry = _registry(max_count=4, max_bytes=adapter_bytes(prepared) - 1)
    registry.register(a)
    registry.store(a, prepared)
    assert registry.cache.num_bytes == adapter_bytes(prepared)
    assert registry.trim(protected=set()) == [a.lora_int_id]  # over the bound by its copy
