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

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = TESTS / "helpers" / "shard_loading_run.py"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """tiny_config (D 64, 4 heads and 2 kv heads of 16, I 96, V 128) in 3 safetensors files,
    loaded at tp 2 and 4 (kv heads repeated to 4) in float32 and bfloat16."""
    folder = write_checkpoint(tmp_path_factory.mktemp("sharded"), tiny_config(), seed=5, shards=3)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["2-float32", "2-bfloat16", "4-float32", "4-bfloat16"])
def test_every_parameter_read_into_its_shards_equals_the_unsplit_load_laid_out(loaded, case):
    out = loaded[case]
    assert len(out["equal"]) == 2 * 6 + 3  # two layers of six, embed, norm, lm_head
    assert all(out["equal"].values()), [k for k, ok in out["equal"].items() if not ok]
    assert set(out["dtype"].values()) == {case.split("-")[1]}


# Split axis of each parameter (None: replicated, the [D] norms).
AXES = {"qkv": 0, "o": 1, "gate_up": 0, "down": 1, "attn_norm": None, "mlp_norm": None,
        "embed": 0, "lm_head": 0, "norm": None}


@pytest.mark.parametrize("size", [2, 4])
def test_each_device_holds_only_its_slice_of_every_parameter(loaded, size):
    out = loaded[f"{size}-float32"]
    for key, shards in out["shards"].items():
        axis = AXES[key.rsplit("'", 2)[-2]]
        want = list(out["global"][key])
        if axis is not None:
            want[axis] //= size
        assert [shape for shape, _ in shards] == [want] * size, key
        assert [device for _, device in shards] == list(range(size)), key


@pytest.mark.parametrize("size", [2, 4])
def test_no_read_from_the_checkpoint_is_larger_than_one_devices_slice(loaded, size):
    out = loaded[f"{size}-float32"]  # float32 on disk and in the model: bytes compare alike
    assert out["largest_read_bytes"] <= out["largest_param_bytes"] // size
