"""LlamaConfig: reading config.json, and refusing what we cannot run with errors that name it."""

import json

import numpy as np
import pytest
from helpers.checkpoints import tiny_config

from models import LlamaConfig
from models.rope import static_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_config_reads_gqa_fields_and_derives_head_dim():
    config = LlamaConfig.from_dict(tiny_config())
    assert config.hidden_size == 64
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.head_dim == 16
    assert config.rope_scaling is None and config.rope_type == "default"
    assert (config.bos_token_id, config.eos_token_id, config.torch_dtype) == (1, 2, "float32")


def test_explicit_head_dim_and_missing_kv_heads_give_mha_with_that_head_dim():
    d = tiny_config(head_dim=32)
    del d["num_key_value_heads"]
    config = LlamaConfig.from_dict(d)
    assert config.head_dim == 32 and config.num_key_value_heads == 4
    assert config.projection_shapes()["q_proj"] == (64, 128)
    assert config.projection_shapes()["o_proj"] == (128, 64)


def test_projection_shapes_cover_all_seven_projections_for_mqa():
    config = LlamaConfig.from_dict(tiny_config(num_key_value_heads=1))
    assert config.projection_shapes() == {
        "q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64),
        "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}


def test_eos_list_becomes_a_tuple_and_the_config_stays_hashable():
    config = LlamaConfig.from_dict(tiny_config(eos_token_id=[2, 7], rope_scaling=LLAMA3))
    assert config.eos_token_id == (2, 7)
    assert hash(config) == hash(LlamaConfig.from_dict(tiny_config(eos_token_id=[2, 7],
                                                                  rope_scaling=LLAMA3)))


def test_from_pretrained_reads_the_folder_and_a_missing_config_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(vocab_size=99)))
    assert LlamaConfig.from_pretrained(tmp_path).vocab_size == 99


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_required_field_is_named(field):
    d = tiny_config()
    del d[field]
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_dict(d)


@pytest.mark.parametrize(("field", "value"), [
    ("num_key_value_heads", 3), ("intermediate_size", 0), ("rms_norm_eps", -1.0),
    ("num_hidden_layers", 1.5), ("head_dim", 15)])
def test_bad_field_value_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_dict(tiny_config(**{field: value}))


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        LlamaConfig.from_dict(tiny_config(architectures=["MistralForCausalLM"]))


@pytest.mark.parametrize(("model_type", "architecture"), [
    ("mixtral", "MixtralForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("gemma3", "Gemma3ForConditionalGeneration"), ("llava", "LlavaForConditionalGeneration")])
def test_moe_and_vision_models_are_refused_in_one_line_naming_the_supported_families(
        model_type, architecture):
    with pytest.raises(ValueError) as err:
        LlamaConfig.from_dict(tiny_config(model_type=model_type, architectures=[architecture]))
    message = str(err.value)
    assert "\n" not in message and repr(model_type) in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"):
        assert family in message


def test_architecture_of_another_family_is_named():
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        LlamaConfig.from_dict(tiny_config(model_type="mistral",
                                          architectures=["Qwen2ForCausalLM"]))


def test_qwen_windows_follow_use_sliding_window_and_max_window_layers():
    qwen = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=4,
                sliding_window=8, max_window_layers=2)
    assert LlamaConfig.from_dict(tiny_config(**qwen)).layer_windows is None
    config = LlamaConfig.from_dict(tiny_config(**qwen, use_sliding_window=True))
    assert config.layer_windows == (None, None, 8, 8) and config.attention_bias


def test_gemma3_transformers4_keys_give_pattern_windows_and_a_local_rope_base():
    config = LlamaConfig.from_dict(tiny_config(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_hidden_layers=6,
        sliding_window=16, sliding_window_pattern=3, rope_local_base_freq=500.0,
        query_pre_attn_scalar=32, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert config.layer_windows == (16, 16, None, 16, 16, None)
    assert config.rope_local_theta == 500.0 and config.rope_scaling["factor"] == 8.0
    assert config.attention_scale == 32 ** -0.5 and config.norm_offset and config.qk_norm
    assert np.allclose(static_inv_freq(config, local=True)[1], 500.0 ** (-2 / 16))


def test_phi3_longrope_fills_transformers_defaults_and_checks_factor_lengths():
    scaling = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    phi = dict(model_type="phi3", architectures=["Phi3ForCausalLM"],
               max_position_embeddings=256, original_max_position_embeddings=64)
    config = LlamaConfig.from_dict(tiny_config(**phi, rope_scaling=scaling))
    assert config.rope_type == "longrope" and config.rope_scaling["factor"] == 4.0
    assert config.rope_scaling["attention_factor"] == pytest.approx(
        np.sqrt(1 + np.log(4.0) / np.log(64)))
    assert hash(config) == hash(LlamaConfig.from_dict(tiny_config(**phi, rope_scaling=scaling)))
    with pytest.raises(ValueError, match="short_factor"):
        LlamaConfig.from_dict(tiny_config(**phi, rope_scaling={**scaling,
                                                               "short_factor": [1.0] * 3}))


def test_partial_rotary_factor_is_refused():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaConfig.from_dict(tiny_config(partial_rotary_factor=0.5))


def test_unsupported_activation_or_bias_is_named():
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_dict(tiny_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias"):
        LlamaConfig.from_dict(tiny_config(attention_bias=True))


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_dict(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_llama3_rope_scaling_without_its_parameters_names_the_missing_one():
    scaling = {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig.from_dict(tiny_config(rope_scaling=scaling))


def test_legacy_type_key_and_transformers5_rope_parameters_are_understood():
    legacy = LlamaConfig.from_dict(tiny_config(rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    d = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    del d["rope_theta"], d["rope_scaling"]
    v5 = LlamaConfig.from_dict(d)
    assert v5.rope_theta == 500000.0 and v5.rope_scaling is None


def test_linear_rope_divides_every_frequency_by_the_factor():
    base = static_inv_freq(LlamaConfig.from_dict(tiny_config()))
    linear = static_inv_freq(LlamaConfig.from_dict(
        tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0})))
    np.testing.assert_allclose(linear, base / 4.0, rtol=1e-6)


def test_llama3_rope_keeps_high_frequencies_and_divides_low_ones_by_the_factor():
    config = LlamaConfig.from_dict(tiny_config(rope_scaling=LLAMA3, head_dim=64))
    base = static_inv_freq(LlamaConfig.from_dict(tiny_config(head_dim=64)))
    scaled = static_inv_freq(config)
    wavelen = 2 * np.pi / base
    high, low = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], base[high])
    np.testing.assert_allclose(scaled[low], base[low] / 8.0, rtol=1e-6)
    middle = ~high & ~low
    assert np.all(scaled[middle] < base[middle]) and np.all(scaled[middle] > base[middle] / 8.0)
