"""A checkpoint read straight into tensor-parallel shards (models.shard_loading).

The split runs on 4 forced CPU devices in a subprocess (the device count has to be set before
JAX is imported); tests/worker/test_tensor_parallel.py checks the split model's outputs against
transformers+PEFT.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.checkpoints import tiny_config, write_checkpoint
from helpers.fixtures import Reference

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = TESTS / "helpers" / "shard_loading_run.py"
FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """tiny_config (D 64, 4 heads and 2 kv heads of 16, I 96, V 128) in 3 safetensors files,
    loaded at tp 2 and 4 (kv heads repeated to 4) in float32 and bfloat16; and each family's
    reference checkpoint (4 heads, 2 kv heads, V 128) at tp 2 and 4 in float32."""
    folder = write_checkpoint(tmp_path_factory.mktemp("sharded"), tiny_config(), seed=5, shards=3)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    families = [str(Reference(f).model) for f in FAMILIES]
    proc = subprocess.run([sys.executable, str(SCRIPT), str(folder), *families], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["2-float32", "2-bfloat16", "4-float32", "4-bfloat16"])
def test_every_parameter_read_into_its_shards_equals_the_unsplit_load_laid_out(loaded, case):
    out = loaded[case]
    assert len(out["equal"]) == 2 * 6 + 3  # two layers of six, embed, norm, lm_head
    assert all(out["equal"].values()), [k for k, ok in out["equal"].items() if not ok]
    assert set(out["dtype"].values()) == {case.split("-")[1]}


# Split axis of each parameter (None: replicated, the [D] and [head_dim] norms).
AXES = {"qkv": 0, "o": 1, "gate_up": 0, "down": 1, "attn_norm": None, "mlp_norm": None,
        "embed": 0, "lm_head": 0, "norm": None, "qkv_bias": 0, "q_norm": None, "k_norm": None,
        "post_attn_norm": None, "post_mlp_norm": None}


def _check_shards(out: dict, size: int) -> None:
    for key, shards in out["shards"].items():
        axis = AXES[key.rsplit("'", 2)[-2]]
        want = list(out["global"][key])
        if axis is not None:
            want[axis] //= size
        assert [shape for shape, _ in shards] == [want] * size, key
        assert [device for _, device in shards] == list(range(size)), key


@pytest.mark.parametrize("size", [2, 4])
def test_each_device_holds_only_its_slice_of_every_parameter(loaded, size):
    _check_shards(loaded[f"{size}-float32"], size)


@pytest.mark.parametrize("size", [2, 4])
def test_no_read_from_the_checkpoint_is_larger_than_one_devices_slice(loaded, size):
    out = loaded[f"{size}-float32"]  # float32 on disk and in the model: bytes compare alike
    assert out["largest_read_bytes"] <= out["largest_param_bytes"] // size


# What each family adds to Llama's parameters (models.families), and whether it ties lm_head.
FAMILY_PARAMS = {"mistral": (set(), False), "qwen2": ({"qkv_bias"}, True),
                 "qwen3": ({"q_norm", "k_norm"}, False),
                 "gemma2": ({"post_attn_norm", "post_mlp_norm"}, True),
                 "gemma3_text": ({"q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"}, True),
                 "phi3": (set(), False)}


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_weights_read_into_their_shards_equal_the_unsplit_load(loaded, family,
                                                                             size):
    """q|k|v biases split with their columns, q/k and Gemma's extra norms replicated, a tied
    embedding split over the vocabulary, Phi-3's fused qkv_proj / gate_up_proj sliced."""
    out = loaded[f"{family}-{size}"]
    assert all(out["equal"].values()), [k for k, ok in out["equal"].items() if not ok]
    names = {key.rsplit("'", 2)[-2] for key in out["equal"]}
    extra, tied = FAMILY_PARAMS[family]
    assert extra <= names and ("lm_head" in names) != tied, names
    _check_shards(out, size)
    assert out["largest_read_bytes"] <= out["largest_param_bytes"] // size
