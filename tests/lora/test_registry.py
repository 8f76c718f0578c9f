"""The CPU-side adapter registry: LRU within capacity, protected and in-memory adapters kept."""

from pathlib import Path

import pytest
from helpers.peft import TinyShapes, make_adapter

from lora_jax.lora.adapters import load_adapter
from lora_jax.lora.registry import AdapterRegistry
from lora_jax.request import LoRARequest

SHAPES = TinyShapes()


def _registry(capacity: int) -> AdapterRegistry:
    return AdapterRegistry(SHAPES, max_lora_rank=8, capacity=capacity, served="tiny-llama",
                           served_path=Path("/models/tiny-llama"))


def _requests(tmp_path, n: int) -> list[LoRARequest]:
    return [LoRARequest(f"a{i}", i + 1, str(make_adapter(tmp_path / f"a{i}", seed=i)))
            for i in range(n)]


def test_adapters_beyond_capacity_are_evicted_least_recently_used_first(tmp_path):
    registry = _registry(capacity=2)
    a, b, c = _requests(tmp_path, 3)
    registry.register(a)
    registry.register(b)
    registry.register(a)  # a is now the most recently used
    registry.register(c)
    registry.trim(protected=set())
    assert registry.ids() == {a.lora_int_id, c.lora_int_id}


def test_protected_and_in_memory_adapters_outlive_capacity(tmp_path):
    registry = _registry(capacity=1)
    a, b, c = _requests(tmp_path, 3)
    memory = LoRARequest("mem", 9, "memory://mem")
    registry.register(memory, load_adapter(a.lora_path, base=SHAPES, max_lora_rank=8))
    for req in (a, b, c):
        registry.register(req)
    registry.trim(protected={a.lora_int_id})
    assert registry.ids() == {memory.lora_int_id, a.lora_int_id}


def test_a_known_adapter_is_read_from_disk_once_and_reused(tmp_path):
    registry = _registry(capacity=4)
    (a,) = _requests(tmp_path, 1)
    first, replaced_first = registry.register(a)
    again, replaced_again = registry.register(a)
    assert again is first and not replaced_first and not replaced_again


def test_new_in_memory_weights_under_a_known_id_are_a_replacement(tmp_path):
    registry = _registry(capacity=4)
    (a,) = _requests(tmp_path, 1)
    registry.register(a)
    weights = load_adapter(str(make_adapter(tmp_path / "other", seed=7)), base=SHAPES,
                           max_lora_rank=8)
    adapter, replaced = registry.register(a, weights)
    assert replaced and adapter is weights and registry.adapter(a.lora_int_id) is weights


def test_an_id_registered_for_another_path_is_rejected_naming_both(tmp_path):
    registry = _registry(capacity=4)
    a, b = _requests(tmp_path, 2)
    registry.register(a)
    with pytest.raises(ValueError, match="already registered") as err:
        registry.register(LoRARequest("b", a.lora_int_id, b.lora_path))
    assert a.lora_path in str(err.value) and b.lora_path in str(err.value)


@pytest.mark.parametrize("name,ok", [("tiny-llama", True), ("/models/tiny-llama", True),
                                     ("org/tiny-llama", True), ("other-model", False)])
def test_base_model_name_must_name_the_served_model(tmp_path, name, ok):
    registry = _registry(capacity=4)
    path = str(make_adapter(tmp_path / "a"))
    req = LoRARequest("a", 1, path, base_model_name=name)
    if ok:
        registry.register(req)
    else:
        with pytest.raises(ValueError, match="other-model"):
            registry.register(req)


def test_in_memory_weights_that_do_not_fit_the_base_are_rejected_naming_the_adapter(tmp_path):
    registry = _registry(capacity=4)
    big = load_adapter(str(make_adapter(tmp_path / "big", r=16)), base=SHAPES, max_lora_rank=16)
    with pytest.raises(ValueError, match="'big'.*rank 16 above max_rank 8"):
        registry.register(LoRARequest("big", 1, "memory://big"), big)
