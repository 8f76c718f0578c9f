import json
import math

import numpy as np
import pytest
from helpers.peft import TinyShapes, make_adapter, peft_config, random_lora_tensors, write_adapter

from lora_jax.lora.adapters import load_adapter, save_adapter

SHAPES = TinyShapes()
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pair(tensors, layer, proj, adapter_name=None):
    parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    infix = f".{adapter_name}" if adapter_name else ""
    prefix = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
    return tensors[f"{prefix}.lora_A{infix}.weight"], tensors[f"{prefix}.lora_B{infix}.weight"]


def test_loaded_adapter_holds_stacked_a_and_scaled_b_per_touched_module(tmp_path):
    tensors = random_lora_tensors(SHAPES, ALL, r=4, seed=1)
    folder = write_adapter(tmp_path / "a", peft_config(r=4, lora_alpha=8, target_modules=ALL),
                           tensors)
    adapter = load_adapter(str(folder), base=SHAPES, max_lora_rank=16)
    assert set(adapter.modules) == set(ALL) and adapter.rank == 4
    for proj in ALL:
        d_in, d_out = SHAPES.projection_shapes()[proj]
        w = adapter.modules[proj]
        assert w.a.shape == (2, d_in, 4) and w.b.shape == (2, 4, d_out)
        for layer in range(2):
            a, b = _pair(tensors, layer, proj)
            np.testing.assert_allclose(w.a[layer], a.T)
            np.testing.assert_allclose(w.b[layer], b.T * 2.0, rtol=1e-6)


def test_untouched_modules_are_absent_not_zero(tmp_path):
    adapter = load_adapter(str(make_adapter(tmp_path / "qv")), base=SHAPES)
    assert set(adapter.modules) == {"q_proj", "v_proj"}


def test_keys_with_an_adapter_name_load_like_plain_keys(tmp_path):
    plain = random_lora_tensors(SHAPES, ("q_proj",), seed=3)
    named = random_lora_tensors(SHAPES, ("q_proj",), seed=3, adapter_name="default")
    cfg = peft_config(target_modules=["q_proj"])
    a = load_adapter(str(write_adapter(tmp_path / "p", cfg, plain)), base=SHAPES)
    b = load_adapter(str(write_adapter(tmp_path / "n", cfg, named)), base=SHAPES)
    np.testing.assert_array_equal(a.modules["q_proj"].b, b.modules["q_proj"].b)


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    tensors = random_lora_tensors(SHAPES, ("q_proj",), r=4, seed=2)
    cfg = peft_config(r=4, lora_alpha=6, target_modules=["q_proj"], use_rslora=True)
    adapter = load_adapter(str(write_adapter(tmp_path / "rs", cfg, tensors)), base=SHAPES)
    _, b = _pair(tensors, 0, "q_proj")
    np.testing.assert_allclose(adapter.modules["q_proj"].b[0], b.T * 6 / math.sqrt(4), rtol=1e-6)


def test_rank_and_alpha_patterns_set_per_module_rank_and_scaling(tmp_path):
    tensors = random_lora_tensors(SHAPES, ("q_proj", "o_proj"), ranks={"o_proj": 2}, r=4, seed=4)
    cfg = peft_config(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|o_proj)",
                      rank_pattern={"o_proj": 2}, alpha_pattern={"q_proj": 32})
    adapter = load_adapter(str(write_adapter(tmp_path / "pat", cfg, tensors)), base=SHAPES)
    assert adapter.modules["o_proj"].rank == 2 and adapter.rank == 4
    _, b_q = _pair(tensors, 1, "q_proj")
    _, b_o = _pair(tensors, 1, "o_proj")
    np.testing.assert_allclose(adapter.modules["q_proj"].b[1], b_q.T * 32 / 4, rtol=1e-6)
    np.testing.assert_allclose(adapter.modules["o_proj"].b[1], b_o.T * 8 / 2, rtol=1e-6)


def test_bfloat16_adapter_loads_as_float32(tmp_path):
    import ml_dtypes

    tensors = random_lora_tensors(SHAPES, ("q_proj",), seed=5, dtype=ml_dtypes.bfloat16)
    folder = write_adapter(tmp_path / "bf", peft_config(target_modules=["q_proj"]), tensors)
    adapter = load_adapter(str(folder), base=SHAPES)
    assert adapter.modules["q_proj"].a.dtype == np.float32


def test_save_then_load_round_trips_weights(tmp_path):
    tensors = random_lora_tensors(SHAPES, ALL, ranks={"k_proj": 2}, r=4, seed=6)
    cfg = peft_config(r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"k_proj": 2})
    adapter = load_adapter(str(write_adapter(tmp_path / "src", cfg, tensors)), base=SHAPES)
    for alpha, rslora in [(None, False), (16, False), (16, True)]:
        out = tmp_path / f"out-{alpha}-{rslora}"
        save_adapter(adapter, out, lora_alpha=alpha, use_rslora=rslora)
        back = load_adapter(str(out), base=SHAPES)
        assert set(back.modules) == set(ALL)
        for proj in ALL:
            np.testing.assert_allclose(back.modules[proj].a, adapter.modules[proj].a)
            np.testing.assert_allclose(back.modules[proj].b, adapter.modules[proj].b, rtol=1e-6)
    saved = json.loads((tmp_path / "out-16-True" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == 16 and saved["use_rslora"] is True and saved["r"] == 4


def test_saved_keys_are_the_ones_peft_writes(tmp_path):
    adapter = load_adapter(str(make_adapter(tmp_path / "a")), base=SHAPES)
    save_adapter(adapter, tmp_path / "out", base_model_name_or_path="tiny-llama")
    from safetensors.numpy import load_file

    keys = set(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 16)


def test_tilde_in_a_local_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_adapter(tmp_path / "my-adapter")
    assert set(load_adapter("~/my-adapter", base=SHAPES).modules) == {"q_proj", "v_proj"}


def _cache_snapshot(cache, repo_id, source):
    """Lay out a Hub cache entry as huggingface_hub writes it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_id_resolves_from_the_cache_in_offline_mode(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    _cache_snapshot(tmp_path / "cache", "org/tiny-adapter", make_adapter(tmp_path / "src"))
    adapter = load_adapter("org/tiny-adapter", base=SHAPES, cache_dir=str(tmp_path / "cache"))
    assert set(adapter.modules) == {"q_proj", "v_proj"}


def test_unknown_hub_id_in_offline_mode_is_file_not_found(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="org/missing"):
        load_adapter("org/missing", base=SHAPES, cache_dir=str(tmp_path / "cache"))


def test_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing local folder"):
        load_adapter(str(tmp_path / "no" / "such" / "folder"), base=SHAPES)


# Each rejection: (how to break a valid adapter folder, the message a user sees)
def _with_config(**changes):
    def breaker(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return breaker


def _drop_config_key(key):
    def breaker(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        del cfg[key]
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return breaker


def _rewrite_tensors(change):
    def breaker(folder):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return breaker


def _truncate(folder):
    file = folder / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-40])


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
REJECTIONS = {
    "r_zero": (_with_config(r=0), ValueError, "r must be a positive int"),
    "dora": (_with_config(use_dora=True), ValueError, "DoRA"),
    "bias": (_with_config(bias="all"), ValueError, "bias='all'"),
    "modules_to_save": (_with_config(modules_to_save=["lm_head"]), ValueError, "modules_to_save"),
    "unserved_target": (_with_config(target_modules=["q_proj", "embed_tokens"]), ValueError,
                        r"\['embed_tokens'\] are not served"),
    "missing_key": (_drop_config_key("lora_alpha"), ValueError, "has no 'lora_alpha' key"),
    "malformed_json": (lambda f: (f / "adapter_config.json").write_text("{r: 4"), ValueError,
                       "not valid JSON"),
    "missing_config": (lambda f: (f / "adapter_config.json").unlink(), FileNotFoundError,
                       "adapter_config.json is missing"),
    "missing_b": (_rewrite_tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")), ValueError,
                  "has lora_A but no lora_B"),
    "nan": (_rewrite_tensors(lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((0, 0), np.nan)),
            ValueError, "NaN or infinite"),
    "wrong_shape": (_rewrite_tensors(lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", np.ones((4, 12), np.float32))), ValueError,
        "maps 12 -> 16 features, but the base model's q_proj maps 16 -> 16"),
    "extra_layer": (_rewrite_tensors(lambda t: t.update({
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.ones((4, 16), "f4"),
        "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": np.ones((16, 4), "f4"),
    })), ValueError, "beyond the base model's 2 layers"),
    "embedding_lora": (_rewrite_tensors(lambda t: t.update({
        "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((4, 10), "f4")})),
        ValueError, "targets a module lora-jax does not serve"),
    "truncated": (_truncate, ValueError, "truncated or corrupt"),
    "bin_only": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
                 ValueError, "only adapter_model.bin"),
    "wrong_rank": (_with_config(r=8), ValueError, "do not have the configured rank 8"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_unservable_adapter_is_rejected_with_a_clear_message(tmp_path, case):
    breaker, error, message = REJECTIONS[case]
    folder = make_adapter(tmp_path / "bad")
    breaker(folder)
    with pytest.raises(error, match=message) as info:
        load_adapter(str(folder), name="bad-adapter", base=SHAPES, max_lora_rank=16)
    if error is ValueError:
        assert "bad-adapter" in str(info.value)


def test_adapter_with_rank_above_max_lora_rank_is_rejected(tmp_path):
    folder = make_adapter(tmp_path / "big", r=32, lora_alpha=32)
    with pytest.raises(ValueError, match="rank 32, above max_lora_rank=16"):
        load_adapter(str(folder), base=SHAPES, max_lora_rank=16)
