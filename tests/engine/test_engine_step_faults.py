"""A step that fails ends its own requests with the error; the engine serves the rest."""

import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _engine(ref, async_scheduling=True):
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=4, max_num_seqs=8,
              max_model_len=64, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    return llm, llm.llm_engine


def _drive(engine: LLMEngine, requests, fail_on_step: int, lose_device_state: bool,
           where: str = "dispatch"):
    """Add `requests` (id -> (prompt, lora)) one step apart, fail step `fail_on_step` when it
    is dispatched, or when its tokens are read (`where="collect"`: a fault the device reports
    late)."""
    runner, calls = engine.core.runner, []
    real_run = getattr(runner, where)

    def flaky_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on_step:
            if lose_device_state:  # as when a device error strikes after the pool was donated
                runner.kv.k.delete()
            raise RuntimeError("device fault")
        return real_run(*args, **kwargs)

    setattr(runner, where, flaky_run)
    finals, pending = {}, list(requests.items())
    try:
        while pending or engine.has_unfinished_requests():
            if pending:
                request_id, (prompt, lora) = pending.pop(0)
                engine.add_request(request_id, prompt, GREEDY, lora)
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
    finally:
        setattr(runner, where, real_run)
    return finals


@pytest.mark.parametrize("where", ["dispatch", "collect"])
@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("lose_device_state", [False, True], ids=["state_kept", "state_lost"])
def test_a_failed_step_fails_only_its_requests(lose_device_state, async_scheduling, where):
    ref = Reference("gqa")
    lora = LoRARequest("all_r4", 1, ref.adapter_path("all_r4"))
    requests = {f"r{i}": ({"prompt_token_ids": ref.prompt(i % 3)}, lora if i % 2 else None)
                for i in range(5)}
    _, clean_engine = _engine(ref)
    clean = _drive(clean_engine, requests, fail_on_step=-1, lose_device_state=False)
    _, engine = _engine(ref, async_scheduling)
    got = _drive(engine, requests, fail_on_step=3, lose_device_state=lose_device_state,
                 where=where)
    failed = {rid for rid, out in got.items() if out.error}
    assert failed and failed != set(requests)
    for rid in failed:
        assert "device fault" in got[rid].error and got[rid].outputs == []
    for rid in set(requests) - failed:
        assert got[rid].error is None
        assert got[rid].outputs[0].token_ids == clean[rid].outputs[0].token_ids
    # The engine keeps serving: a new request after the fault runs as on a clean engine.
    engine.add_request("after", {"prompt_token_ids": ref.prompt(0)}, GREEDY, lora)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].outputs[0].token_ids == clean["r3"].outputs[0].token_ids
    assert engine.stats().kv_blocks_used == 0
