"""Presence, frequency and repetition penalties in LLM.generate, against a float64 NumPy Llama
decoding greedily with vLLM's penalty rules."""

import numpy as np
import pytest
from helpers.checkpoints import random_tensors, tiny_config, write_checkpoint
from helpers.numpy_llama import reference_logits

from lora_jax import LLM, SamplingParams
from models import LlamaConfig

PROMPTS = [[5, 9, 9, 14, 3, 7], [20, 21, 20, 21, 20]]
STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config()
    tensors = random_tensors(config, seed=4)
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), config, tensors=tensors)
    # max_prefill_chunk 4 splits the prompts: the prompt history must span chunks.
    llm = LLM(str(folder), max_num_seqs=4, max_prefill_chunk=4)
    return llm, tensors, LlamaConfig.from_dict(config)


def _reference(tensors, config, prompt, presence=0.0, frequency=0.0, repetition=1.0):
    out: list[int] = []
    for _ in range(STEPS):
        logits = reference_logits(tensors, config, prompt + out)[-1]
        counts = np.bincount(out, minlength=len(logits))
        seen = (counts > 0) | np.isin(np.arange(len(logits)), prompt)
        logits = np.where(seen, np.where(logits > 0, logits / repetition, logits * repetition),
                          logits)
        logits = logits - frequency * counts - presence * (counts > 0)
        out.append(int(np.argmax(logits)))
    return out


def _params(**penalties) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, **penalties)


CASES = [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5),
         dict(presence_penalty=2.0, frequency_penalty=-0.5, repetition_penalty=0.7)]


def test_greedy_with_penalties_equals_vllm_rules_on_a_numpy_llama(setup):
    llm, tensors, config = setup
    plain = [_reference(tensors, config, p) for p in PROMPTS]
    for penalties in CASES:
        want = [_reference(tensors, config, p, **{k.split("_")[0]: v
                                                  for k, v in penalties.items()})
                for p in PROMPTS]
        assert want != plain, penalties  # the penalties change the greedy path
        # A penalized and an unpenalized copy of each prompt share every batch.
        prompts = [{"prompt_token_ids": p} for p in PROMPTS for _ in range(2)]
        params = [_params(**penalties), _params()] * len(PROMPTS)
        outs = llm.generate(prompts, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert got[0::2] == want, penalties
        assert got[1::2] == plain, penalties


def test_a_reused_row_forgets_the_previous_sequence(setup):
    llm, tensors, config = setup
    want = _reference(tensors, config, PROMPTS[1], presence=2.0)
    for _ in range(2):  # the second call reuses the first call's cache rows
        out = llm.generate([{"prompt_token_ids": PROMPTS[1]}], _params(presence_penalty=2.0),
                           use_tqdm=False)
        assert out[0].outputs[0].token_ids == want


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0)])
def test_penalty_out_of_range_is_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
