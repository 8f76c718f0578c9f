"""The CPU default LoRA backend ("tiled": tokens grouped by slot once per step) serves what the
every-slot "dense" backend serves, through the engine: steps with one, a few and many distinct
adapters, base requests, ranks below max_lora_rank and more slots than adapters."""

import math

import pytest
from helpers.checkpoints import tiny_config, write_checkpoint
from helpers.peft import TinyShapes, make_adapter

from lora_jax import LLM, LoRARequest, SamplingParams

SHAPES = TinyShapes(hidden_size=64, kv_size=32, intermediate_size=96)
MODULES = [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"), ("gate_proj", "down_proj")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiled")
    model = str(write_checkpoint(root / "base", tiny_config()))
    adapters = [
        LoRARequest(f"a{i}", i + 1, str(make_adapter(
            root / f"a{i}", shapes=SHAPES, r=(2, 4, 8)[i % 3], lora_alpha=4,
            modules=MODULES[i % 3], seed=i)))
        for i in range(7)]
    # Prompts of different lengths, each on an adapter (7 of them) and on the base: prefill
    # chunks and decode rows with up to 7 distinct adapters in a step, then fewer.
    cases = [(j, req) for j in range(10) for req in (adapters[j % 7], None)]
    prompts = [{"prompt_token_ids": [(5 * j + k) % 120 + 3 for k in range(3 + 2 * j)]}
               for j, _ in cases]
    return model, prompts, [req for _, req in cases]


def _generate(served, backend):
    model, prompts, reqs = served
    llm = LLM(model, enable_lora=True, max_loras=16, max_lora_rank=8, max_num_seqs=16,
              max_num_batched_tokens=64, lora_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    return llm.generate(prompts, params, reqs, use_tqdm=False)


@pytest.mark.slow
def test_the_tiled_backend_serves_the_dense_backends_tokens(served):
    want = _generate(served, "dense")
    got = _generate(served, "tiled")
    # The adapters change what is generated (each adapter request is followed by the same
    # prompt on the base model): the comparison below is a real one.
    changed = [want[i].outputs[0].token_ids != want[i + 1].outputs[0].token_ids
               for i in range(0, len(want), 2)]
    assert sum(changed) >= len(changed) // 2
    for a, b in zip(got, want, strict=True):
        assert a.error is None and b.error is None
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert math.isclose(a.outputs[0].cumulative_logprob, b.outputs[0].cumulative_logprob,
                            abs_tol=1e-4)
