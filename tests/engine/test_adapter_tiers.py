"""Adapters in tiers: loads off the step path, few slots serving many tenants."""

import threading

import numpy as np
import pytest
from helpers.peft import TinyShapes, make_adapter

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.engine.llm_engine import LLMEngine
from lora_jax.lora import slots as slots_module
from lora_jax.sampling_params import RequestOutputKind

SHAPES = TinyShapes(2, 64, 32, 192)  # the tiny base model's projections
NUM_ADAPTERS = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[LoRARequest]:
    root = tmp_path_factory.mktemp("tenants")
    return [LoRARequest(f"t{i}", i + 1, str(make_adapter(
        root / f"t{i}", seed=10 + i, shapes=SHAPES, r=4 if i % 2 else 8,
        modules=("q_proj", "v_proj") if i % 3 else ("q_proj", "o_proj", "down_proj"))))
        for i in range(NUM_ADAPTERS)]


def _params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_a_cold_adapter_loads_in_the_background_while_other_streams_keep_stepping(
        base_model, adapters, monkeypatch):
    warm, cold = adapters[0], adapters[1]
    engine = LLMEngine.from_options(base_model, enable_lora=True, max_loras=2, max_num_seqs=4,
                                    max_lora_rank=8)
    gate, reads, packs = threading.Event(), [], []
    plain = engine.adapters.reader
    pack_host = slots_module.pack_host

    def recorded_pack(*args, **kwargs):  # packing into the slots' layout: the loader's work
        packs.append(threading.current_thread().name)
        return pack_host(*args, **kwargs)

    monkeypatch.setattr(slots_module, "pack_host", recorded_pack)

    def slow_reader(req):
        reads.append((req.lora_int_id, threading.current_thread().name))
        if req.lora_int_id == cold.lora_int_id:
            assert gate.wait(60), "the test never opened the gate"
        return plain(req)

    engine.adapters.reader = slow_reader
    delta = _params(40, output_kind=RequestOutputKind.DELTA)
    engine.add_request("base", "hello", delta)
    engine.add_request("warm", "hello", delta, warm)
    tokens = {"base": 0, "warm": 0, "cold": 0}
    while tokens["warm"] < 2:
        for out in engine.step():
            tokens[out.request_id] += len(out.outputs[0].token_ids)
    engine.add_request("cold", "hello", _params(8), cold)  # its read now waits on the gate
    before = dict(tokens)
    for _ in range(10):
        for out in engine.step():
            tokens[out.request_id] += len(out.outputs[0].token_ids)
    # Ten steps ran while the load was under way: each running stream got a token from each
    # (one step's tokens are read the step after).
    assert tokens["base"] - before["base"] >= 9 and tokens["warm"] - before["warm"] >= 9
    assert tokens["cold"] == 0
    stats = engine.stats()
    assert stats.waiting_adapters == [cold.lora_int_id]
    assert stats.requests_waiting_on_load == 1
    assert all(name.startswith("lora-load") for _, name in reads)
    gate.set()
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    # Both adapters were packed, each once, in the loader's threads: the engine thread's fill
    # only placed the packed weights.
    assert len(packs) == 2 and all(name.startswith("lora-load") for name in packs)
    want = LLM(base_model, enable_lora=True, max_loras=2, max_lora_rank=8).generate(
        "hello", _params(8), cold, use_tqdm=False)[0]
    assert finals["cold"].outputs[0].token_ids == want.outputs[0].token_ids
    assert finals["cold"].error is None


def test_a_failed_background_load_fails_only_its_requests(base_model, adapters, tmp_path):
    engine = LLMEngine.from_options(base_model, enable_lora=True, max_loras=2, max_lora_rank=8)
    missing = LoRARequest("missing", 50, str(tmp_path / "nope"))
    engine.add_request("ok", "hello", _params(6), adapters[2])
    engine.add_request("bad1", "hello", _params(6), missing)
    engine.add_request("bad2", "abc", _params(6), missing)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals[out.request_id] = out
    assert finals["ok"].error is None and len(finals["ok"].outputs[0].token_ids) == 6
    for rid in ("bad1", "bad2"):
        assert finals[rid].error.startswith("FileNotFoundError") and finals[rid].outputs == []
    assert missing.lora_int_id not in engine.list_loras()  # a later request tries again


def _zipf_workload(adapters, n: int, s: float = 1.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(adapters) + 1) ** s
    picks = rng.choice(len(adapters), size=n, p=weights / weights.sum())
    prompts = [f"{chr(97 + i % 26)}{i}?" for i in range(n)]
    return prompts, [adapters[i] for i in picks]


def test_a_zipf_workload_through_two_slots_equals_all_adapters_in_slots(base_model, adapters):
    prompts, loras = _zipf_workload(adapters, 24)
    assert len({lr.lora_int_id for lr in loras}) >= 5  # more tenants than slots
    params = _params(6)
    few = LLM(base_model, enable_lora=True, max_loras=2, max_cpu_loras=2, max_lora_rank=8,
              max_num_seqs=8)
    got = few.generate(prompts, params, loras, use_tqdm=False)
    every = LLM(base_model, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=8,
                max_num_seqs=8)
    want = every.generate(prompts, params, loras, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    stats = few.engine.stats()
    # Two places in host memory for five or more tenants: each was read, some were evicted.
    tenants = len({lr.lora_int_id for lr in loras})
    assert stats.adapter_loads >= tenants and stats.adapter_evictions["cpu"] >= tenants - 2
