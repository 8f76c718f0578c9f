"""Adapters that cover only some layers, served by LLM.generate beside full-layer adapters and
the base model: PEFT's greedy tokens and their logprobs (tests/fixtures/reference/partial)."""

import math

import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams

PARTIAL = ("regex_layers", "layers_pattern", "one_layer", "excluded", "all_linear")


@pytest.fixture(scope="module")
def partial():
    ref = Reference("partial")
    # Fewer slots than adapters: partial adapters land in slots that full ones held before.
    llm = LLM(ref.model, enable_lora=True, max_loras=3, max_lora_rank=8, max_num_seqs=8)
    reqs = {"base": None, **{name: LoRARequest(name, i + 1, ref.adapter_path(name))
                             for i, name in enumerate(ref.adapters)}}
    return ref, llm, reqs


def test_partial_adapters_in_a_mixed_batch_give_peft_greedy_tokens_and_logprobs(partial):
    ref, llm, reqs = partial
    cases = [(name, j) for j in range(ref.num_prompts) for name in reqs]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], params,
                        [reqs[name] for name, _ in cases])
    # Every partial adapter moves some greedy path off the base model's: a real comparison.
    assert all(any(ref.greedy(n, j) != ref.greedy("base", j) for j in range(ref.num_prompts))
               for n in PARTIAL) and set(PARTIAL) < set(ref.adapters)
    for (name, j), out in zip(cases, outs, strict=True):
        assert out.error is None, (name, j, out.error)
        comp = out.outputs[0]
        assert comp.token_ids == ref.greedy(name, j), (name, j)
        want = ref.greedy_logprobs(name, j)
        for t, (token, logprobs) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            assert token in logprobs
            for other, lp in logprobs.items():
                assert math.isclose(lp, want[t, other], abs_tol=1e-4), (name, j, t, other)
        total = sum(want[t, tok] for t, tok in enumerate(comp.token_ids))
        assert math.isclose(comp.cumulative_logprob, total, abs_tol=1e-4 * len(want))

