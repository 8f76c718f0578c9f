"""The Pallas kernels of a split model (LoRA and ragged paged attention, under shard_map) in
interpret mode on 4 forced CPU devices: the tokens of transformers+PEFT and the logprobs of
one device.

Runs tests/helpers/tensor_parallel_run.py in a subprocess (the device count has to be set
before JAX is imported).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SCRIPT = TESTS / "helpers" / "tensor_parallel_run.py"


def _run(spec: dict, timeout: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted():
    """gqa, the base and 4 adapters over one prompt, every kernel the Pallas one in interpret
    mode, at tp 1, 2 and 4 (kv heads repeated to 4)."""
    return _run({"sizes": [1, 2, 4], "num_kv_blocks": 10, "compile_on_start": False,
                 "max_tokens": 4, "rounds": 1, "num_prompts": 1,
                 "lora_backend": "pallas_interpret", "attention_backend": "pallas_interpret"},
                timeout=900)


@pytest.mark.parametrize("size", ["1", "2", "4"])
def test_split_pallas_kernels_give_the_reference_tokens(interpreted, size):
    outs = interpreted[size]["rounds"][0]
    assert len(outs) == 5
    for out in outs:
        assert out["tokens"] == out["reference"], (size, out["case"])


@pytest.mark.parametrize("size", ["2", "4"])
def test_split_pallas_kernels_match_one_device_logprobs_within_1e_4(interpreted, size):
    for a, b in zip(interpreted[size]["rounds"][0], interpreted["1"]["rounds"][0], strict=True):
        assert a["case"] == b["case"] and a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_split_pallas_kernels_carry_the_familys_switches_equal_to_peft(family):
    """Gemma 2 (sliding window, attention soft-cap, tied embedding split over the vocabulary)
    and Qwen2 (q|k|v biases) at tp 2 with every kernel the Pallas one in interpret mode: the
    window and soft-cap reach the attention kernel each device runs."""
    import numpy as np
    from helpers.fixtures import Reference

    out = _run({"sizes": [2], "variants": [family], "num_kv_blocks": 64, "max_tokens": 4,
                "compile_on_start": False, "rounds": 1, "num_prompts": 1,
                "lora_backend": "pallas_interpret", "attention_backend": "pallas_interpret"},
               timeout=900)[family]
    ref = Reference(family)
    for result in out["rounds"][0]:
        name, j = result["case"]
        assert result["tokens"] == result["reference"], (name, j)
        want = ref.greedy_logprobs(name, j)
        got = np.asarray(result["logprobs"])
        np.testing.assert_allclose(got, want[np.arange(len(got)), result["tokens"]], atol=1e-4,
                                   rtol=0, err_msg=f"{family} {name} {j}")
