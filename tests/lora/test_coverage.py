"""PEFT's rule for which (layer, projection) pairs an adapter_config.json covers.

Every expected set here is written out by hand from PEFT's documented behaviour (and checked
against peft 0.21.2's get_peft_model on a 4-layer LlamaForCausalLM, whose module names are
"model.layers.{i}.{self_attn|mlp}.{proj}").
"""

import pytest

from lora_jax.lora.coverage import (
    check_coverage_config,
    covered_pairs,
    targets_module,
    unserved_targets,
)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pairs(layers, projs):
    return {(layer, proj) for layer in layers for proj in projs}


def test_list_targets_match_a_name_suffix_in_every_layer():
    assert covered_pairs({"target_modules": ["q_proj", "v_proj"]}, 4) == \
        _pairs(range(4), ("q_proj", "v_proj"))
    # A dotted suffix must end at a dot: "attn.q_proj" is not a suffix of "self_attn.q_proj".
    assert covered_pairs({"target_modules": ["self_attn.q_proj"]}, 2) == _pairs(range(2),
                                                                                 ["q_proj"])
    assert covered_pairs({"target_modules": ["attn.q_proj"]}, 2) == set()


def test_regex_targets_are_fullmatched_against_the_full_module_name():
    config = {"target_modules": r".*\.layers\.[0-2]\.self_attn\.(q_proj|v_proj)"}
    assert covered_pairs(config, 4) == _pairs(range(3), ("q_proj", "v_proj"))
    assert targets_module(config, "model.layers.2.self_attn.v_proj")
    assert not targets_module(config, "model.layers.3.self_attn.v_proj")
    # Fullmatch, not search: a bare projection name matches no full module name.
    assert covered_pairs({"target_modules": "q_proj"}, 4) == set()


def test_layers_to_transform_takes_an_int_or_a_list_with_or_without_layers_pattern():
    assert covered_pairs({"target_modules": ["q_proj"], "layers_to_transform": 2}, 4) == \
        {(2, "q_proj")}
    assert covered_pairs({"target_modules": ["q_proj", "down_proj"],
                          "layers_to_transform": [0, 3]}, 4) == \
        _pairs((0, 3), ("q_proj", "down_proj"))
    assert covered_pairs({"target_modules": ["k_proj"], "layers_to_transform": [1, 3],
                          "layers_pattern": "layers"}, 4) == _pairs((1, 3), ["k_proj"])
    assert covered_pairs({"target_modules": ["k_proj"], "layers_to_transform": [1],
                          "layers_pattern": ["h", "layers"]}, 4) == {(1, "k_proj")}
    # A layers_pattern that names no segment of a Llama's module names covers nothing.
    assert covered_pairs({"target_modules": ["k_proj"], "layers_to_transform": [1],
                          "layers_pattern": "h"}, 4) == set()
    # An empty list means every layer.
    assert covered_pairs({"target_modules": ["k_proj"], "layers_to_transform": []}, 2) == \
        _pairs(range(2), ["k_proj"])


def test_a_target_equal_to_a_full_module_name_ignores_layers_to_transform():
    config = {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"],
              "layers_to_transform": [1]}
    assert covered_pairs(config, 3) == {(0, "q_proj"), (1, "v_proj")}


def test_exclude_modules_as_a_list_or_a_regex_removes_pairs():
    config = {"target_modules": ["q_proj", "down_proj"],
              "exclude_modules": ["model.layers.1.self_attn.q_proj"]}
    assert covered_pairs(config, 3) == _pairs(range(3), ("q_proj", "down_proj")) - {
        (1, "q_proj")}
    config = {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["mlp.down_proj"]}
    assert covered_pairs(config, 2) == _pairs(range(2), ["q_proj"])
    config = {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.[01]\..*"}
    assert covered_pairs(config, 4) == _pairs((2, 3), ("q_proj", "down_proj"))


def test_all_linear_means_the_seven_projections_never_lm_head():
    assert covered_pairs({"target_modules": "all-linear"}, 3) == _pairs(range(3), ALL)
    assert covered_pairs({"target_modules": "ALL-LINEAR"}, 1) == _pairs(range(1), ALL)
    assert not targets_module({"target_modules": "all-linear"}, "lm_head")
    assert unserved_targets({"target_modules": "all-linear"}) == []
    excluded = {"target_modules": "all-linear", "exclude_modules": ["mlp.gate_proj", "o_proj"]}
    assert covered_pairs(excluded, 2) == _pairs(range(2), set(ALL) - {"gate_proj", "o_proj"})


def test_targets_outside_the_seven_projections_are_reported_as_unserved():
    assert unserved_targets({"target_modules": ["q_proj", "lm_head"]}) == ["lm_head"]
    assert unserved_targets({"target_modules": ["q_proj", "lm_head"],
                             "exclude_modules": ["lm_head"]}) == []
    assert unserved_targets({"target_modules": r".*"}) == ["lm_head", "model.embed_tokens"]
    assert unserved_targets({"target_modules": r".*\.(q_proj|lm_head)"}) == []


@pytest.mark.parametrize("config, message", [
    ({"target_modules": r".*\.q_proj", "layers_to_transform": [1]},
     "cannot be used with a regex string target_modules"),
    ({"target_modules": "all-linear", "layers_pattern": "layers"},
     "cannot be used with a regex string target_modules"),
    ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "needs layers_to_transform"),
    ({"target_modules": ["q_proj"], "layers_to_transform": "1"}, "must be an int or a list"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [True]}, "must be an int or a list"),
    ({"target_modules": r".*\.(q_proj"}, "is not a valid regex"),
    ({"target_modules": ["q_proj"], "exclude_modules": "(["}, "is not a valid regex"),
    ({"target_modules": ["q_proj"], "exclude_modules": 3}, "exclude_modules must be"),
    ({"target_modules": 5}, "target_modules must be a list"),
])
def test_configs_peft_refuses_are_refused_naming_the_adapter_and_key(config, message):
    with pytest.raises(ValueError, match=message) as info:
        check_coverage_config(config, "my-adapter")
    assert "my-adapter" in str(info.value)
