"""Adapters that PEFT writes for only some layers: they load, uncovered layers add exactly zero,
and a config that disagrees with the weights is a malformed adapter."""

import numpy as np
import pytest
from helpers.checkpoints import random_lora
from helpers.peft import TinyShapes, lora_tensors_for, make_partial_adapter, peft_config
from helpers.peft import write_adapter as write_peft_folder

from lora_jax.lora.adapters import LoRAAdapter, load_adapter
from lora_jax.lora.slots import AdapterSlots
from lora_jax.tools.tiny import tiny_config

FOUR = TinyShapes(num_hidden_layers=4)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REGEX_0_2 = r".*\.layers\.[0-2]\.self_attn\.(q_proj|v_proj)"


def _pairs(layers, projs):
    return {(layer, proj) for layer in layers for proj in projs}


def _a(tensors, layer, proj):
    parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return tensors[f"base_model.model.model.layers.{layer}.{parent}.{proj}.lora_A.weight"]


# name -> (config extras, the pairs that config covers on a 4-layer model, written by hand)
PARTIAL = {
    "regex_over_some_layers": (dict(target_modules=REGEX_0_2), _pairs(range(3), ("q_proj",
                                                                                  "v_proj"))),
    "layers_to_transform_int": (dict(target_modules=["q_proj", "down_proj"],
                                     layers_to_transform=2), _pairs([2], ("q_proj", "down_proj"))),
    "layers_to_transform_list": (dict(target_modules=["k_proj"], layers_to_transform=[0, 3]),
                                 _pairs((0, 3), ["k_proj"])),
    "with_layers_pattern": (dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[1],
                                 layers_pattern="layers"), _pairs([1], ("o_proj", "up_proj"))),
    "exclude_list": (dict(target_modules=["q_proj", "gate_proj"],
                          exclude_modules=["model.layers.3.self_attn.q_proj", "mlp.gate_proj"]),
                     _pairs(range(3), ["q_proj"])),
    "exclude_regex": (dict(target_modules=["v_proj"], exclude_modules=r".*\.layers\.[13]\..*"),
                      _pairs((0, 2), ["v_proj"])),
    "all_linear": (dict(target_modules="all-linear"), _pairs(range(4), ALL)),
}


@pytest.mark.parametrize("case", sorted(PARTIAL))
def test_partial_layer_adapter_loads_with_zeros_for_uncovered_layers(tmp_path, case):
    extras, pairs = PARTIAL[case]
    folder = make_partial_adapter(tmp_path / case, pairs, shapes=FOUR, seed=3, **extras)
    adapter = load_adapter(str(folder), name=case, base=FOUR)
    tensors = lora_tensors_for(pairs, FOUR, seed=3)
    assert set(adapter.modules) == {proj for _, proj in pairs}
    for proj, weights in adapter.modules.items():
        layers = sorted(layer for layer, p in pairs if p == proj)
        assert adapter.layers[proj] == tuple(layers)
        assert weights.a.shape[0] == 4
        for layer in range(4):
            if layer in layers:
                np.testing.assert_array_equal(weights.a[layer], _a(tensors, layer, proj).T)
                assert np.abs(weights.b[layer]).min() > 0
            else:
                assert not weights.a[layer].any() and not weights.b[layer].any()


def test_the_issue_example_regex_over_layers_0_to_2_of_a_4_layer_model_loads(tmp_path):
    pairs = _pairs(range(3), ("q_proj", "v_proj"))
    folder = make_partial_adapter(tmp_path / "a", pairs, shapes=FOUR,
                                  target_modules=r".*\.layers\.[0-2]\.self_attn\.(q_proj|v_proj)")
    adapter = load_adapter(str(folder), base=FOUR)
    assert adapter.layers == {"q_proj": (0, 1, 2), "v_proj": (0, 1, 2)}


def _broken(tmp_path, change, **extras):
    extras = extras or {"target_modules": REGEX_0_2}
    pairs = _pairs(range(3), ("q_proj", "v_proj"))
    tensors = lora_tensors_for(pairs, FOUR)
    change(tensors)
    return write_peft_folder(tmp_path / "bad", peft_config(**extras), tensors)


Q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


@pytest.mark.parametrize("change, message", [
    (lambda t: (t.pop(Q.format(1, "A")), t.pop(Q.format(1, "B"))),
     r"targets layer 1 q_proj \(model.layers.1.self_attn.q_proj.*no lora_A / lora_B"),
    (lambda t: t.pop(Q.format(2, "B")), "layers.2.self_attn.q_proj has lora_A but no lora_B"),
    (lambda t: t.pop(Q.format(0, "A")), "layers.0.self_attn.q_proj has lora_B but no lora_A"),
    (lambda t: t.update({Q.format(3, "A"): np.ones((4, 16), "f4"),
                         Q.format(3, "B"): np.ones((16, 4), "f4")}),
     r"weights for layer 3 q_proj .*which its adapter_config.json does not target"),
])
def test_config_and_weights_that_disagree_are_a_malformed_adapter(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as info:
        load_adapter(str(_broken(tmp_path, change)), name="bad-one", base=FOUR)
    assert "bad-one" in str(info.value)


def test_weights_outside_layers_to_transform_are_refused(tmp_path):
    folder = _broken(tmp_path, lambda t: None, target_modules=["q_proj", "v_proj"],
                     layers_to_transform=[0, 1])
    with pytest.raises(ValueError, match="weights for layer 2 q_proj"):
        load_adapter(str(folder), name="ltt", base=FOUR)


def test_a_list_target_without_any_weights_for_it_is_refused(tmp_path):
    pairs = _pairs(range(2), ["q_proj"])
    folder = write_peft_folder(tmp_path / "a", peft_config(target_modules=["q_proj", "v_proj"]),
                               lora_tensors_for(pairs))
    with pytest.raises(ValueError, match="targets layer 0 v_proj"):
        load_adapter(str(folder), base=TinyShapes())


def test_a_slot_that_held_a_full_adapter_holds_zeros_for_a_partial_ones_uncovered_layers(
        tmp_path):
    config = tiny_config(hidden_size=16, num_hidden_layers=4)
    full = LoRAAdapter("full", random_lora(config, rank=4, seed=1))
    pairs = _pairs((1, 2), ("q_proj", "down_proj"))
    folder = make_partial_adapter(tmp_path / "p", pairs, shapes=config,
                                  target_modules=["q_proj", "down_proj"],
                                  layers_to_transform=[1, 2])
    partial = load_adapter(str(folder), base=config)
    slots = AdapterSlots(config, num_slots=1, max_rank=4)
    slots.activate({1: full}, keep=set())
    assert all(np.asarray(layer.o_b).any() for layer in slots.stacks.layers)
    slots.activate({2: partial}, keep=set())  # evicts the full adapter from the only slot
    for i, layer in enumerate(slots.stacks.layers):
        for name, value in vars(layer).items():
            value = np.asarray(value)
            if i in (1, 2) and name in ("qkv_a", "q_b", "down_a", "down_b"):
                assert value.any(), (i, name)
            else:
                assert not value.any(), (i, name)
