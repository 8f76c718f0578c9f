"""Async scheduling (host one step ahead of the device) changes no output.

The next step is dispatched before the host reads the previous step's tokens, so a sequence
that stops (a stop token, a stop string, EOS, its length) is found to have stopped one step
late, and what that extra step computed for it must vanish: these tests compare every
output with the engine stepping one batch at a time.
"""

import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.sampling_params import MAX_LOGPROBS


def _llm(ref, async_scheduling, **kw):
    options = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
                   max_model_len=128, max_num_batched_tokens=32, block_size=8)
    return LLM(ref.model, async_scheduling=async_scheduling, **(options | kw))


def _params(i: int, stop_token: int | None) -> SamplingParams:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=i),
        dict(temperature=1.0, top_k=5, seed=i, presence_penalty=0.4),
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.3),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.7, n=2, seed=i, logprobs=MAX_LOGPROBS),
    ]
    stops = {"stop_token_ids": [stop_token]} if stop_token is not None else {}
    return SamplingParams(max_tokens=3 + (5 * i) % 14, ignore_eos=i % 4 != 0,
                          **stops, **kinds[i % len(kinds)])


# Logprobs are float32 sums whose order depends on how a step's batch is made up (a
# preempted sequence is recomputed in another batch), so they may differ in the last bits:
# well below this. Tokens, finish and stop reasons are compared exactly.
LOGPROB_TOL = 1e-4


def _exact(outputs):
    return [(o.error, [(c.token_ids, c.finish_reason, c.stop_reason, c.logprobs is None)
                       for c in o.outputs]) for o in outputs]


def _assert_logprobs_close(got, expected):
    for g_out, e_out in zip(got, expected, strict=True):
        for g, e in zip(g_out.outputs, e_out.outputs, strict=True):
            assert g.cumulative_logprob == pytest.approx(e.cumulative_logprob,
                                                         abs=LOGPROB_TOL * len(e.token_ids))
            if e.logprobs is None:
                continue
            for token, g_top, e_top in zip(g.token_ids, g.logprobs, e.logprobs, strict=True):
                assert token in g_top and token in e_top
                for t in g_top.keys() & e_top.keys():
                    assert g_top[t] == pytest.approx(e_top[t], abs=LOGPROB_TOL)
                # A candidate at the edge of the top-k may swap with a near-tie.
                for top, other in ((g_top, e_top), (e_top, g_top)):
                    for t in top.keys() - other.keys():
                        assert top[t] <= min(other.values()) + LOGPROB_TOL


@pytest.mark.parametrize("num_kv_blocks", [None, 10], ids=["roomy_pool", "preempting_pool"])
def test_async_scheduling_gives_the_outputs_of_one_step_at_a_time(num_kv_blocks):
    ref = Reference("gqa")
    loras = [None] + [LoRARequest(n, i + 1, ref.adapter_path(n))
                      for i, n in enumerate(ref.adapters)]
    prompts = [{"prompt_token_ids": (ref.prompt(i % 3) * 6)[:5 + (11 * i) % 40]}
               for i in range(14)]
    requests = [loras[i % len(loras)] for i in range(14)]
    sync = _llm(ref, False, num_kv_blocks=num_kv_blocks)
    # Stop tokens that each request meets early: its own 3rd greedy token.
    probe = sync.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3,
                                                  ignore_eos=True), requests, use_tqdm=False)
    params = [_params(i, probe[i].outputs[0].token_ids[-1] if i % 3 == 1 else None)
              for i in range(14)]
    expected = sync.generate(prompts, params, requests, use_tqdm=False)
    got = _llm(ref, True, num_kv_blocks=num_kv_blocks).generate(prompts, params, requests,
                                                                use_tqdm=False)
    assert _exact(got) == _exact(expected)
    _assert_logprobs_close(got, expected)
    assert any(c.finish_reason == "stop" and len(c.token_ids) < params[i].max_tokens
               for i, o in enumerate(expected) for c in o.outputs)
    if num_kv_blocks:
        assert sync.engine.stats().num_preemptions > 0


def test_a_step_is_dispatched_before_the_previous_steps_tokens_are_read():
    ref = Reference("gqa")
    llm = _llm(ref, True)
    engine = llm.llm_engine
    order = []
    runner = engine.core.runner
    dispatch, collect = runner.dispatch, runner.collect
    runner.dispatch = lambda *a, **k: order.append("dispatch") or dispatch(*a, **k)
    runner.collect = lambda *a, **k: order.append("collect") or collect(*a, **k)
    engine.add_request("r", {"prompt_token_ids": ref.prompt(0)},
                       SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    # Prefill, then 3 decodes: each dispatch but the first comes before the previous collect;
    # a sequence at its length limit is not scheduled again.
    assert order == ["dispatch", "dispatch", "collect", "dispatch", "collect", "dispatch",
                     "collect", "collect"]
    # transformers' greedy tokens for this prompt.
    assert outputs[-1].outputs[0].token_ids == ref.greedy("base", 0)[:4]
