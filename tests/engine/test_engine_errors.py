"""One bad request fails alone, with a clear error; every other request still completes."""

import json
import re
import shutil

import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = Reference("gqa")
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=4, max_num_seqs=8,
              max_model_len=64)
    good = LoRARequest("all_r4", 1, ref.adapter_path("all_r4"))
    return ref, llm, good, tmp_path_factory.mktemp("bad")


def _sampling(**changes) -> SamplingParams:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for name, value in changes.items():
        setattr(params, name, value)  # skips construction checks: generate must still catch it
    return params


def _malformed_adapter(ref, tmp):
    folder = tmp / "malformed"
    shutil.copytree(ref.adapter_path("all_r4"), folder, dirs_exist_ok=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["target_modules"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


# name -> (prompt, sampling params, lora request, expected message)
def _bad_cases(ref, good, tmp):
    ok_prompt = {"prompt_token_ids": ref.prompt(0)}
    return {
        "missing_adapter": (ok_prompt, GREEDY, LoRARequest("gone", 5, str(tmp / "nope")),
                            "FileNotFoundError"),
        "rank_too_high": (ok_prompt, GREEDY, LoRARequest("qv", 6, ref.adapter_path("qv_r8")),
                          "rank 8, above max_lora_rank=4"),
        "malformed_adapter": (ok_prompt, GREEDY,
                              LoRARequest("bad", 7, _malformed_adapter(ref, tmp)),
                              "no 'target_modules' key"),
        "same_id_other_path": (ok_prompt, GREEDY,
                               LoRARequest("other", 1, ref.adapter_path("mlp_rslora")),
                               "lora_int_id 1 is already registered"),
        "prompt_too_long": ({"prompt_token_ids": [5] * 64}, GREEDY, None, "max_model_len 64"),
        "empty_prompt": ({"prompt_token_ids": []}, GREEDY, None, "prompt is empty"),
        "token_out_of_vocab": ({"prompt_token_ids": [1, 500, -3]}, GREEDY, None,
                               "outside the vocabulary"),
        "max_tokens_zero": (ok_prompt, _sampling(max_tokens=0), None, "max_tokens"),
        "negative_temperature": (ok_prompt, _sampling(temperature=-1.0), None, "temperature"),
        "top_p_zero": (ok_prompt, _sampling(top_p=0.0), None, "top_p"),
        "top_p_above_one": (ok_prompt, _sampling(top_p=1.5), None, "top_p"),
        "float_token_id": ({"prompt_token_ids": [5, 6.5]}, GREEDY, None,
                           "prompt_token_ids must be integers, got [6.5]"),
        "bool_token_id": ({"prompt_token_ids": [5, True]}, GREEDY, None,
                          "prompt_token_ids must be integers"),
        "nan_temperature": (ok_prompt, _sampling(temperature=float("nan")), None,
                            "temperature must be a finite number, got nan"),
        "inf_top_p": (ok_prompt, _sampling(top_p=float("inf")), None, "top_p must be a finite"),
        "nan_min_p": (ok_prompt, _sampling(min_p=float("nan")), None, "min_p must be a finite"),
        "nan_presence": (ok_prompt, _sampling(presence_penalty=float("nan")), None,
                         "presence_penalty must be a finite"),
        "inf_frequency": (ok_prompt, _sampling(frequency_penalty=float("-inf")), None,
                          "frequency_penalty must be a finite"),
        "nan_repetition": (ok_prompt, _sampling(repetition_penalty=float("nan")), None,
                           "repetition_penalty must be a finite"),
        "bool_max_tokens": (ok_prompt, _sampling(max_tokens=True), None,
                            "max_tokens must be an integer, got True"),
        "bool_n": (ok_prompt, _sampling(n=True), None, "n must be an integer"),
        "bool_top_k": (ok_prompt, _sampling(top_k=True), None, "top_k must be an integer"),
        "bool_seed": (ok_prompt, _sampling(seed=False), None, "seed must be an integer"),
        "float_max_tokens": (ok_prompt, _sampling(max_tokens=6.5), None,
                             "max_tokens must be an integer, got 6.5"),
        "base_model_mismatch": (ok_prompt, GREEDY, LoRARequest(
            "all_r4-for-other", 8, ref.adapter_path("all_r4"), base_model_name="meta/other"),
            "is for base model 'meta/other'"),
    }


def test_each_bad_request_fails_alone_and_the_rest_complete_correctly(setup):
    ref, llm, good, tmp = setup
    cases = _bad_cases(ref, good, tmp)
    prompts, params, loras = [], [], []
    for j in range(2):  # good requests before the bad ones: their ids are registered first
        prompts.append({"prompt_token_ids": ref.prompt(j)})
        params.append(GREEDY)
        loras.append(good if j == 0 else None)
    for prompt, p, lora, _ in cases.values():
        prompts.append(prompt)
        params.append(p)
        loras.append(lora)
    outs = llm.generate(prompts, params, loras)
    assert outs[0].outputs[0].token_ids == ref.greedy("all_r4", 0)[:6]
    assert outs[1].outputs[0].token_ids == ref.greedy("base", 1)[:6]
    for (name, (_, _, _, message)), out in zip(cases.items(), outs[2:], strict=True):
        assert out.error is not None and message in out.error, (name, out.error)
        assert out.outputs == [] and out.finished


@pytest.mark.parametrize("case", ["missing_adapter", "empty_prompt", "max_tokens_zero",
                                  "float_token_id", "nan_temperature", "bool_max_tokens"])
def test_a_single_bad_prompt_raises_from_generate(setup, case):
    ref, llm, good, tmp = setup
    prompt, params, lora, message = _bad_cases(ref, good, tmp)[case]
    if message == "FileNotFoundError":
        with pytest.raises(FileNotFoundError):
            llm.generate(prompt, params, lora)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            llm.generate(prompt, params, lora)


def test_invalid_sampling_params_are_rejected_when_built():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)


def test_lora_request_without_enable_lora_is_a_clear_error():
    ref = Reference("gqa")
    llm = LLM(ref.model, max_num_seqs=2)
    with pytest.raises(ValueError, match="enable_lora=True"):
        llm.generate({"prompt_token_ids": [1, 5]}, GREEDY,
                     LoRARequest("a", 1, ref.adapter_path("all_r4")))


def test_list_arguments_of_the_wrong_length_are_rejected():
    ref = Reference("gqa")
    llm = LLM(ref.model, max_num_seqs=2)
    with pytest.raises(ValueError, match="lora_request has 1 entries for 2 prompts"):
        llm.generate([{"prompt_token_ids": [1]}] * 2, GREEDY, [None])
