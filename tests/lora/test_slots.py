"""Device slots: idle adapters leave least recently used first; adapters in use never leave;
adapters brought in together land as they would one by one."""

import jax
import numpy as np
import pytest

from lora_jax.lora.slots import AdapterSlots
from lora_jax.tools.tiny import tiny_config
from lora_jax.tools.workload import random_adapter

CONFIG = tiny_config(hidden_size=32)


def _adapters(*ids):
    return {i: random_adapter(CONFIG, 2, seed=i, targets=("q_proj",)) for i in ids}


def test_idle_adapters_leave_the_slots_least_recently_used_first():
    slots = AdapterSlots(CONFIG, 2, 2)
    slots.activate(_adapters(1), keep=set())
    slots.activate(_adapters(2), keep=set())
    slots.activate(_adapters(1), keep=set())  # 1 used again: 2 is now the least recent
    slot_of_2 = slots.slot_of(2)
    slots.activate(_adapters(3), keep=set())
    assert sorted(slots.loaded()) == [1, 3] and slots.slot_of(3) == slot_of_2
    slot_of_1 = slots.slot_of(1)
    slots.activate(_adapters(4), keep=set())  # 1 is the least recent now
    assert sorted(slots.loaded()) == [3, 4] and slots.slot_of(4) == slot_of_1
    assert slots.num_loads == 4  # each adapter written once; a used one is not rewritten


def test_an_adapter_in_use_keeps_its_slot_and_a_full_device_says_so():
    slots = AdapterSlots(CONFIG, 2, 2)
    slots.activate(_adapters(1, 2), keep=set())
    slots.activate(_adapters(3), keep={2})  # 1 is idle, 2 is in use
    assert sorted(slots.loaded()) == [2, 3]
    with pytest.raises(RuntimeError, match="no free adapter slot"):
        slots.activate(_adapters(4), keep={2, 3})


@pytest.mark.parametrize("count", [3, 11])
def test_adapters_brought_in_together_fill_their_slots_as_one_by_one_fills(count):
    together, one_by_one = AdapterSlots(CONFIG, 12, 4), AdapterSlots(CONFIG, 12, 4)
    adapters = {i: random_adapter(CONFIG, 1 + i % 4, seed=i) for i in range(1, count + 1)}
    together.activate(_adapters(99), keep=set())  # a resident adapter the fills must keep
    one_by_one.activate(_adapters(99), keep=set())
    together.activate(adapters, keep=set())
    for lora_id, adapter in adapters.items():
        one_by_one.activate({lora_id: adapter}, keep=set())
    assert together.loaded() == one_by_one.loaded() and together.num_loads == count + 1
    for mine, theirs in zip(jax.tree.leaves(together.stacks), jax.tree.leaves(one_by_one.stacks),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(together.stacks))


def test_a_step_uses_the_lora_sites_of_its_adapters_only():
    slots = AdapterSlots(CONFIG, 3, 2)
    slots.activate({1: random_adapter(CONFIG, 2, 1, targets=("q_proj",)),
                    2: random_adapter(CONFIG, 2, 2, targets=("down_proj",))}, keep=set())
    assert slots.sites([1]).tolist() == [True, False, False, False]  # qkv, o, gate_up, down
    assert slots.sites([1, 2]).tolist() == [True, False, False, True]
    assert not slots.sites([]).any()  # a base-only step runs no adapter work


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_slot_refilled_by_a_prepared_adapter_holds_exactly_its_packed_weights(dtype):
    """The loader packs adapters off the engine thread (prepare); a fill over a slot that held
    an adapter on every projection leaves exactly the new adapter there, zeros elsewhere."""
    prepared_slots, plain = AdapterSlots(CONFIG, 3, 4, dtype), AdapterSlots(CONFIG, 3, 4, dtype)
    everywhere = random_adapter(CONFIG, 4, seed=7)
    q_v = random_adapter(CONFIG, 3, seed=8, targets=("q_proj", "v_proj"))
    for slots in (prepared_slots, plain):
        slots.activate({1: everywhere}, keep=set())
        slots.evict(1)
    prepared = prepared_slots.prepare(q_v)
    assert prepared.packed is not None and sorted(prepared.packed[2]) == ["q_b", "qkv_a", "v_b"]
    prepared_slots.activate({2: prepared}, keep=set())
    plain.activate({2: q_v}, keep=set())
    slot = plain.slot_of(2)
    assert prepared_slots.slot_of(2) == slot
    want = AdapterSlots(CONFIG, 1, 4, dtype)
    want.activate({2: q_v}, keep=set())
    for mine, theirs, alone in zip(jax.tree.leaves(prepared_slots.stacks),
                                   jax.tree.leaves(plain.stacks),
                                   jax.tree.leaves(want.stacks), strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
        np.testing.assert_array_equal(np.asarray(mine)[slot], np.asarray(alone)[0])


def test_a_bfloat16_fill_writes_the_slot_in_place_without_converting_the_stacks():
    """XLA:CPU computes bfloat16 in float32: an update done as bfloat16 converts each whole
    stack and back (a copy of every slot per fill). The fill updates the bits instead."""
    slots = AdapterSlots(CONFIG, 4, 2, "bfloat16")
    compiled = slots._set.lower(slots.stacks, jax.numpy.int32(1), slots._zeros).compile()
    text = compiled.as_text()
    assert "dynamic-update-slice" in text
    assert " convert(" not in text
