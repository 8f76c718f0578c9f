"""Tensor parallelism on 4 forced CPU devices: a split model serves what the unsplit one does.

Each case runs tests/helpers/tensor_parallel_run.py in a subprocess: the device count has to be
set before JAX is imported, and this process has already imported it with one device.
"""

import json
import os
import re
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
def churn():
    """gqa, the base and 4 adapters over 3 prompts (15 requests) with 2 adapter slots, a pool
    of 10 blocks of 8 (preemptions), and the same requests again (prefix-cache hits)."""
    return _run({"sizes": [1, 2, 4], "num_kv_blocks": 10, "compile_on_start": False,
                 "max_tokens": 8, "rounds": 2, "errors": [3]}, timeout=600)


def test_split_model_gives_the_reference_tokens_through_churn_prefix_caching_and_preemption(
        churn):
    for size in ("1", "2", "4"):
        stats = churn[size]["stats"]
        assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0, (size, stats)
        for outs in churn[size]["rounds"]:
            for out in outs:
                assert out["tokens"] == out["reference"], (size, out["case"])


def test_split_model_logprobs_match_one_device_within_1e_4(churn):
    for size in ("2", "4"):
        for split, whole in zip(churn[size]["rounds"], churn["1"]["rounds"], strict=True):
            for a, b in zip(split, whole, strict=True):
                assert a["case"] == b["case"] and a["tokens"] == b["tokens"]
                assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"],
                                                      strict=True)) < 1e-4, a["case"]


# The global shape of each array, and the axis tensor parallelism splits (None = replicated).
# gqa: D 32, 4 heads and 2 kv heads of 8, I 64, V 128, 2 slots of rank 8; at tp 4 the two kv
# heads are repeated to four, so k and v columns, the pool and k_b grow to 4 heads. The
# embedding (and lm_head) split over the vocabulary.
SPLITS = {"qkv": 0, "o": 1, "gate_up": 0, "down": 1, "embed": 0, "lm_head": 0, "kv_k": 3,
          "lora_qkv_a": None, "lora_q_b": 2, "lora_k_b": 2, "lora_o_a": 1, "lora_o_b": None,
          "lora_gate_b": 2, "lora_down_a": 1}


@pytest.mark.parametrize("size", [2, 4])
def test_each_device_holds_only_its_shard_of_the_weights_lora_stacks_and_kv_pool(churn, size):
    shards = churn[str(size)]["shards"]
    kv_heads = max(2, size)
    assert shards["qkv"]["global"] == [(4 + 2 * kv_heads) * 8, 32]
    assert shards["kv_k"]["global"] == [2, 10, 8, kv_heads, 8]
    for name, axis in SPLITS.items():
        whole = shards[name]["global"]
        want = list(whole)
        if axis is not None:
            want[axis] //= size
        got = shards[name]["shards"]
        assert [shape for shape, _ in got] == [want] * size, name
        assert sorted(device for _, device in got) == list(range(size)), name


# Whole on every device, by Megatron's split: the LoRA shrink matrices of the column-parallel
# projections and the expand matrices of the row-parallel ones (each token's adapter input and
# output are whole on every device; [D, slots, n*R] and [slots, R, D] are small next to the
# weights), and the sampler's penalty history ([rows, V]: the sampler reads whole logits rows).
REPLICATED = re.compile(r"lora\.layers\[\d+\]\.(qkv_a|gate_up_a|o_b|down_b)|history\.\w+")


@pytest.mark.parametrize("size", [2, 4])
def test_no_array_sits_whole_on_a_device_but_the_replicated_ones_listed(churn, size):
    whole = churn[str(size)]["whole"]  # live arrays of >= 256 elements some device holds whole
    assert any(w["name"].startswith("lora.") for w in whole if w["name"])
    for w in whole:
        assert w["name"] is not None and REPLICATED.fullmatch(w["name"]), w
        assert w["devices"] == size, w


@pytest.mark.parametrize("size", [2, 4])
def test_each_device_holds_its_share_of_the_weights_and_devices_balance(churn, size):
    one = churn["1"]["stats"]["memory"]["device_bytes_loaded"]["0"]
    stats = churn[str(size)]["stats"]["memory"]
    loaded = [stats["device_bytes_loaded"][str(d)] for d in range(size)]
    assert max(loaded) <= 1.10 * one / size, (loaded, one)
    started = [stats["device_bytes_started"][str(d)] for d in range(size)]
    assert max(started) <= 1.10 * min(started), started
    assert stats["host_peak_rss_load_bytes"] > 0 and stats["host_peak_rss_start_bytes"] > 0


def test_a_size_that_does_not_divide_the_heads_is_refused_naming_the_fix(churn):
    message = churn["errors"]["3"]
    assert "tensor_parallel_size 3 does not divide the model's 4 attention heads" in message
    assert "choose a tensor_parallel_size that divides it" in message


@pytest.mark.slow
def test_split_engine_compiles_every_program_at_start_up_and_nothing_after():
    out = _run({"sizes": [2, 4], "num_kv_blocks": 10, "compile_on_start": True,
                "max_tokens": 8, "rounds": 2}, timeout=900)
    for size in ("2", "4"):
        compile_stats = out[size]["compile"]
        # One program per token bucket (8, 16, 32 for max_num_batched_tokens=32).
        assert compile_stats["programs_at_start"] == 3, compile_stats
        assert compile_stats["compiled_after_start"] == 0, compile_stats
        assert all(o["tokens"] == o["reference"] for outs in out[size]["rounds"] for o in outs)
