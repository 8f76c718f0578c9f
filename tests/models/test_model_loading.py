"""load_llama: Hugging Face folders in, named errors out, one tensor at a time in host memory."""

import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.checkpoints import random_tensors, tiny_config, write_checkpoint

from models import load_llama


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_single_file_and_sharded_checkpoints_load_the_same_weights(tmp_path):
    single = load_llama(write_checkpoint(tmp_path / "single", seed=3))
    sharded_folder = write_checkpoint(tmp_path / "sharded", seed=3, shards=3)
    assert len(list(sharded_folder.glob("model-0000*-of-00003.safetensors"))) == 3
    for a, b in zip(_params(single), _params(load_llama(sharded_folder)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_keep_the_hf_out_in_layout_and_pack_q_k_v(tmp_path):
    tensors = random_tensors(tiny_config())
    model = load_llama(write_checkpoint(tmp_path, tensors=tensors))
    qkv = np.asarray(model.layers[1].qkv[...])  # layer 1: [q | k | v, D] as HF stores them
    np.testing.assert_array_equal(qkv[:64], tensors["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(qkv[96:], tensors["model.layers.1.self_attn.v_proj.weight"])
    gate_up = np.asarray(model.layers[0].gate_up[...])
    np.testing.assert_array_equal(gate_up[96:], tensors["model.layers.0.mlp.up_proj.weight"])
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), tensors["lm_head.weight"])


def test_tied_embeddings_have_no_lm_head_and_a_stray_copy_is_ignored(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    tensors = random_tensors(config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    model = load_llama(write_checkpoint(tmp_path, config, tensors=tensors))
    assert model.lm_head is None
    hidden = jnp.ones((1, 64))
    np.testing.assert_allclose(np.asarray(model.logits(hidden)),
                               np.ones((1, 64)) @ tensors["model.embed_tokens.weight"].T, atol=1e-5)


def test_a_missing_tensor_is_reported_by_name(tmp_path):
    tensors = random_tensors(tiny_config())
    del tensors["model.layers.1.mlp.down_proj.weight"], tensors["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: lm_head.weight, "
                                         r"model.layers.1.mlp.down_proj.weight"):
        load_llama(write_checkpoint(tmp_path, tensors=tensors))


def test_an_unexpected_tensor_is_reported_by_name(tmp_path):
    tensors = random_tensors(tiny_config())
    tensors["model.layers.2.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensors: model.layers.2.self_attn.q_proj"):
        load_llama(write_checkpoint(tmp_path, tensors=tensors))


def test_a_misshapen_tensor_is_reported_with_both_shapes(tmp_path):
    tensors = random_tensors(tiny_config())
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                         r"\[64, 64\], config.json implies \[32, 64\]"):
        load_llama(write_checkpoint(tmp_path, tensors=tensors))


def test_a_folder_without_safetensors_is_file_not_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llama(tmp_path)


def test_a_shard_missing_from_the_index_is_file_not_found(tmp_path):
    folder = write_checkpoint(tmp_path, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_llama(folder)


def test_auto_dtype_follows_the_checkpoint_and_an_explicit_dtype_casts(tmp_path):
    folder = write_checkpoint(tmp_path, dtype="bfloat16")
    assert all(p.dtype == jnp.bfloat16 for p in _params(load_llama(folder)))
    assert all(p.dtype == jnp.float32 for p in _params(load_llama(folder, dtype="float32")))


def test_unsupported_dtypes_are_rejected_naming_the_dtype(tmp_path):
    folder = write_checkpoint(tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="float16"):
        load_llama(folder)
    with pytest.raises(ValueError, match="int8"):
        load_llama(folder, dtype="int8")
    assert load_llama(folder, dtype="bfloat16").dtype == jnp.bfloat16


def test_loading_holds_about_one_tensor_at_a_time_in_host_memory(tmp_path):
    config = tiny_config(hidden_size=128, intermediate_size=512, num_hidden_layers=8)
    folder = write_checkpoint(tmp_path, config)
    load_llama(folder)  # compiles the in-place writes: first-use allocations are not loading's
    tracemalloc.start()
    load_llama(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A whole copy of the weights would be the file's size; tensor-at-a-time stays far below it
    # (the margin covers JAX's own bookkeeping, which varies with what ran before).
    assert peak < 0.25 * (folder / "model.safetensors").stat().st_size
