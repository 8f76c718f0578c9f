"""logit_bias and min_tokens through LLM.generate on the tiny checkpoint: per-row inputs of the
compiled step, applied before sampling as vLLM applies them (logprobs stay the model's), greedy
and seeded."""

import pytest

from lora_jax import LLM, SamplingParams

EOS = 2  # the tiny checkpoint's
STEPS = 6


@pytest.fixture(scope="module")
def llm(base_model):
    return LLM(base_model, max_num_seqs=4)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": STEPS, "ignore_eos": True, **kw})


def seeded(**kw) -> SamplingParams:
    return greedy(**{"temperature": 1.0, "seed": 7, **kw})


def run(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("make", [greedy, seeded])
def test_a_bias_of_minus_100_keeps_the_token_out(llm, make):
    plain = run(llm, ["hello"], make())[0].token_ids
    biased = run(llm, ["hello"], make(logit_bias={plain[0]: -100}))[0].token_ids
    assert plain[0] not in biased


@pytest.mark.parametrize("make", [greedy, seeded])
def test_a_bias_of_100_makes_the_token_the_pick_at_every_step(llm, make):
    plain = run(llm, ["hello"], make())[0].token_ids
    target = next(t for t in range(3, 98) if t not in plain)  # a character of the tokenizer
    assert run(llm, ["hello"], make(logit_bias={target: 100}))[0].token_ids == [target] * STEPS


@pytest.mark.parametrize("make", [greedy, seeded])
def test_a_bias_applies_to_its_row_only(llm, make):
    prompts = ["hello", "hello", "abc"]
    without = run(llm, prompts, [make()] * 3)  # the same batch, nobody biased
    bias = {without[0].token_ids[0]: -100, without[0].token_ids[1]: 40.5}
    mixed = run(llm, prompts, [make(logit_bias=bias), make(), make()])
    assert [c.token_ids for c in mixed[1:]] == [c.token_ids for c in without[1:]]
    assert mixed[0].token_ids != without[0].token_ids
    assert without[0].token_ids[0] not in mixed[0].token_ids


@pytest.mark.parametrize("make", [greedy, seeded])
def test_min_tokens_keeps_eos_off_until_reached(llm, make):
    # EOS biased to be the pick at every step: without min_tokens the output ends at once.
    eager = make(logit_bias={EOS: 100}, ignore_eos=False, max_tokens=8)
    assert run(llm, ["hello"], eager)[0].token_ids == [EOS]
    held = run(llm, ["hello"], make(logit_bias={EOS: 100}, ignore_eos=False, max_tokens=8,
                                    min_tokens=4))[0]
    # Held for outputs 1..4 (each step sampled with the hold its output number calls for,
    # though the host runs a step ahead), then EOS at once.
    assert len(held.token_ids) == 5 and held.finish_reason == "stop"
    no_eos = run(llm, ["hello"], make(logit_bias={EOS: -100}, max_tokens=4))[0]
    assert held.token_ids == no_eos.token_ids + [EOS]


def test_min_tokens_and_stop_ids_are_per_row(llm):
    first = run(llm, ["hello"], greedy())[0].token_ids[0]
    params = [greedy(stop_token_ids=[first], min_tokens=3), greedy(stop_token_ids=[first]),
              greedy(logit_bias={EOS: 100}, ignore_eos=False, min_tokens=2)]
    outs = run(llm, ["hello", "hello", "abc"], params)
    assert len(outs[0].token_ids) >= 3 and first not in outs[0].token_ids[:3]
    assert outs[1].token_ids == [first] and outs[1].stop_reason == first
    assert len(outs[2].token_ids) == 3 and outs[2].token_ids[-1] == EOS


def test_logprobs_are_the_models_not_the_biased_ones(llm):
    plain = run(llm, ["hello"], greedy(logprobs=5, max_tokens=1))[0]
    second = sorted(plain.logprobs[0], key=plain.logprobs[0].get)[-2]  # the runner-up
    biased = run(llm, ["hello"], greedy(logprobs=5, max_tokens=1, logit_bias={second: 100}))[0]
    assert biased.token_ids == [second]
    assert biased.logprobs[0][second] == pytest.approx(plain.logprobs[0][second], abs=1e-5)


def test_too_many_held_ids_and_bias_ids_past_the_vocabulary_are_refused(llm):
    with pytest.raises(ValueError, match="min_tokens holds off at most 64 token ids"):
        llm.generate("hello", greedy(min_tokens=1, stop_token_ids=list(range(3, 70))),
                     use_tqdm=False)
    with pytest.raises(ValueError, match=r"logit_bias token ids \[128\] are outside"):
        llm.generate("hello", greedy(logit_bias={128: 1}), use_tqdm=False)
    # 64 held ids fit.
    assert llm.generate("hello", greedy(min_tokens=1, stop_token_ids=list(range(3, 67))),
                        use_tqdm=False)[0].outputs[0].token_ids
