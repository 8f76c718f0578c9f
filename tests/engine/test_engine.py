"""LLM.generate end to end on the reference fixtures: equal to transformers + PEFT."""

import math

import numpy as np
import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _requests(ref: Reference) -> dict[str, LoRARequest | None]:
    reqs = {"base": None}
    for i, name in enumerate(ref.adapters):
        reqs[name] = LoRARequest(name, i + 1, ref.adapter_path(name))
    return reqs


@pytest.fixture(scope="module")
def gqa():
    ref = Reference("gqa")
    # max_loras below the number of adapters: adapters must take turns in the slots.
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8)
    return ref, llm


def test_mixed_batch_greedy_equals_transformers_peft_token_for_token(gqa):
    ref, llm = gqa
    reqs = _requests(ref)
    cases = [(name, j) for j in range(ref.num_prompts) for name in reqs]
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], GREEDY,
                        [reqs[name] for name, _ in cases])
    for (name, j), out in zip(cases, outs, strict=True):
        assert out.error is None
        assert out.outputs[0].token_ids == ref.greedy(name, j), (name, j)
        assert out.outputs[0].finish_reason == "length"
        assert out.prompt_token_ids == ref.prompt(j) and out.lora_request == reqs[name]


@pytest.mark.parametrize("variant", ["tied", "llama3"])
def test_greedy_equals_transformers_peft_for_tied_mqa_and_llama3_rope(variant):
    ref = Reference(variant)
    reqs = _requests(ref)
    llm = LLM(ref.model, enable_lora=True, max_loras=len(reqs) - 1, max_lora_rank=8,
              max_num_seqs=16)
    cases = [(name, j) for j in range(ref.num_prompts) for name in reqs]
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], GREEDY,
                        [reqs[name] for name, _ in cases])
    assert [o.outputs[0].token_ids for o in outs] == [ref.greedy(n, j) for n, j in cases]


def test_first_token_logprob_matches_the_reference_distribution(gqa):
    ref, llm = gqa
    req = _requests(ref)["all_r4"]
    out = llm.generate({"prompt_token_ids": ref.prompt(1)},
                       SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), req)
    comp = out[0].outputs[0]
    expected = ref.logits("all_r4", 1)[-1]
    expected = expected - np.log(np.exp(expected - expected.max()).sum()) - expected.max()
    top5 = np.argsort(-expected)[:5]
    assert set(comp.logprobs[0]) == set(top5.tolist())
    for token, lp in comp.logprobs[0].items():
        assert math.isclose(lp, expected[token], abs_tol=1e-4)
    assert math.isclose(comp.cumulative_logprob, expected[comp.token_ids[0]], abs_tol=1e-4)


def test_long_lora_request_gets_linear_rope_scaling_and_others_keep_the_base_rope():
    ref = Reference("long_lora")
    factor = ref.manifest["linear_factor"]
    max_len = ref.manifest["long_lora_max_len"]
    assert factor == math.ceil(max_len / 32)
    llm = LLM(ref.model, enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=max_len)
    long_req = LoRARequest("long", 1, ref.adapter_path("long"), long_lora_max_len=max_len)
    one = SamplingParams(temperature=0.0, max_tokens=1, logprobs=3)
    short = {"prompt_token_ids": ref.prompt(0)[:20]}
    prompts = [{"prompt_token_ids": ref.prompt(j)} for j in range(2)]
    short_alone = llm.generate(short, one)[0].outputs[0]
    outs = llm.generate(prompts + [short], one, [long_req, long_req, None])
    for j in range(2):
        expected = ref.logits("long", j)[-1]
        logp = expected - expected.max() - np.log(np.exp(expected - expected.max()).sum())
        comp = outs[j].outputs[0]
        assert comp.token_ids == [int(np.argmax(expected))]
        for token, lp in comp.logprobs[0].items():
            assert math.isclose(lp, logp[token], abs_tol=1e-4)
    assert outs[2].outputs[0].token_ids == short_alone.token_ids
    assert math.isclose(outs[2].outputs[0].cumulative_logprob, short_alone.cumulative_logprob,
                        abs_tol=1e-5)


def test_long_prompt_is_refused_without_long_lora_but_served_with_it():
    ref = Reference("long_lora")
    llm = LLM(ref.model, enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64)
    plain = LoRARequest("plain", 1, ref.adapter_path("long"))
    assert llm.generate([{"prompt_token_ids": ref.prompt(1)}], GREEDY, plain)[0].error is None
    with pytest.raises(ValueError, match="long_lora_max_len 128 above max_model_len 64"):
        llm.generate({"prompt_token_ids": [1, 2]}, GREEDY,
                     LoRARequest("big", 2, ref.adapter_path("long"), long_lora_max_len=128))


def test_seeded_request_is_reproducible_whatever_shares_its_batch(gqa):
    ref, llm = gqa
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=1234, max_tokens=8,
                            ignore_eos=True)
    other = SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True)
    prompt = {"prompt_token_ids": ref.prompt(2)}
    alone = llm.generate(prompt, seeded)[0].outputs[0].token_ids
    crowd = llm.generate([{"prompt_token_ids": ref.prompt(0)}, prompt,
                          {"prompt_token_ids": ref.prompt(1)}], [other, seeded, other])
    assert crowd[1].outputs[0].token_ids == alone


def test_n_samples_come_back_as_distinct_completions(gqa):
    ref, llm = gqa
    out = llm.generate({"prompt_token_ids": ref.prompt(0)},
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6,
                                      ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_token_ids_end_a_sequence_with_stop(gqa):
    ref, llm = gqa
    expected = ref.greedy("base", 0)
    stop_at = expected[3]
    out = llm.generate({"prompt_token_ids": ref.prompt(0)},
                       SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                      stop_token_ids=[stop_at]))[0].outputs[0]
    first = expected.index(stop_at)
    assert out.token_ids == expected[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)


def test_adapter_management_add_list_pin_remove(gqa):
    ref, llm = gqa
    reqs = _requests(ref)
    assert llm.add_lora(reqs["qv_r8"]) and reqs["qv_r8"].lora_int_id in llm.list_loras()
    assert llm.pin_lora(reqs["qv_r8"].lora_int_id)
    pinned_slot = llm.engine.adapters.slots.slot_of(reqs["qv_r8"].lora_int_id)
    # Two slots, one pinned: the other adapters take turns in the remaining slot.
    out = llm.generate([{"prompt_token_ids": ref.prompt(0)}] * 4, GREEDY,
                       [reqs["all_r4"], reqs["mlp_rslora"], reqs["patterns"], reqs["qv_r8"]])
    assert [o.outputs[0].token_ids for o in out] == [
        ref.greedy(n, 0) for n in ("all_r4", "mlp_rslora", "patterns", "qv_r8")]
    assert llm.engine.adapters.slots.slot_of(reqs["qv_r8"].lora_int_id) == pinned_slot
    assert llm.remove_lora(reqs["qv_r8"].lora_int_id)
    assert reqs["qv_r8"].lora_int_id not in llm.list_loras()
