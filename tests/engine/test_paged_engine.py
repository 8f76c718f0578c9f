"""The paged KV cache through LLM: preemption, prefix caching, the pool's size."""

import os

import pytest
from helpers.checkpoints import write_checkpoint

from lora_jax import LLM, SamplingParams
from lora_jax.tools.tiny import config_dict, tiny_config

PROMPTS = [{"prompt_token_ids": [(7 * i + j) % 50 + 3 for j in range(9 + 3 * i)]}
           for i in range(4)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(tiny_config())))


def _ids(outputs):
    return [out.outputs[0].token_ids for out in outputs]


def _preempted_and_roomy(base, params):
    roomy = LLM(base, max_num_seqs=4).generate(PROMPTS, params, use_tqdm=False)
    small = LLM(base, max_num_seqs=4, num_kv_blocks=12, block_size=4)
    tight = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.engine.stats().num_preemptions > 0
    assert small.engine.stats().kv_blocks_used == 0  # every block back once done
    return tight, roomy


def test_preemption_under_a_small_pool_gives_the_unpreempted_greedy_outputs(base):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tight, roomy = _preempted_and_roomy(base, params)
    assert _ids(tight) == _ids(roomy)


def test_preemption_under_a_small_pool_keeps_seeded_samples_and_their_distributions(base):
    # A recomputed sequence's logits come from the prefill path instead of the decode path:
    # equal within float32 noise, so a seeded draw that lands within that noise of a token's
    # cumulative-probability boundary may pick the neighbouring token. Everything before
    # such a draw must be equal, with the same logprobs, and it must stay rare.
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True,
                            logprobs=1)
    tight, roomy = _preempted_and_roomy(base, params)
    diverged = 0
    for a, b in zip(tight, roomy, strict=True):
        a, b = a.outputs[0], b.outputs[0]
        assert len(a.token_ids) == len(b.token_ids) == 24
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True))
                     if x != y), 24)
        diverged += same < 24
        for i in range(min(same + 1, 24)):  # the diverging draw's distribution too
            assert max(a.logprobs[i].values()) == pytest.approx(max(b.logprobs[i].values()),
                                                                abs=1e-4)
    assert diverged <= 1


def test_a_shared_prefix_is_computed_once_and_changes_no_output(base):
    prefix = list(range(3, 35))
    prompts = [{"prompt_token_ids": prefix + [40 + i, 41 + i]} for i in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cached = LLM(base, max_num_seqs=4, block_size=8)
    first = cached.generate(prompts[:1], params, use_tqdm=False)
    rest = cached.generate(prompts[1:], params, use_tqdm=False)
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits >= 2 * 4  # the 4 prefix blocks, for both later requests
    plain = LLM(base, max_num_seqs=4, block_size=8, enable_prefix_caching=False)
    assert _ids(first + rest) == _ids(plain.generate(prompts, params, use_tqdm=False))
    assert plain.engine.stats().prefix_cache_hits == 0


def test_the_pool_is_the_bytes_asked_for_whatever_max_num_seqs_and_max_model_len(base):
    sizes = {LLM(base, max_num_seqs=n, max_model_len=m, kv_cache_memory_bytes=1 << 20)
             .engine.kv_cache_bytes for n, m in ((2, 64), (64, 256))}
    assert len(sizes) == 1 and (1 << 20) - 64 * 1024 < sizes.pop() <= 1 << 20


def test_a_request_that_can_never_fit_the_pool_is_refused_at_once(base):
    llm = LLM(base, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"needs 20 tokens of KV cache, but the whole pool "
                                         r"holds 16"):
        llm.generate({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=10))
    out = llm.generate([{"prompt_token_ids": [5] * 10}, {"prompt_token_ids": [5, 6]}],
                       SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert out[0].error and "kv_cache_memory_bytes" in out[0].error
    assert len(out[1].outputs[0].token_ids) == 10


# scripts/gpu_check.sh sets LORA_JAX_TEST_BACKEND=pallas to run the real kernel on a GPU.
@pytest.mark.parametrize("backend", [
    "reference", os.environ.get("LORA_JAX_TEST_BACKEND", "pallas_interpret")])
def test_the_ragged_attention_kernel_serves_what_the_cpu_path_serves(base, backend):
    # Decodes and prefill chunks share steps (max_num_batched_tokens 16 splits the prompts),
    # a prefix repeats, and the pool is small enough to preempt.
    prompts = PROMPTS + [{"prompt_token_ids": PROMPTS[3]["prompt_token_ids"][:17] + [9, 9]}]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    options = dict(max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=14, block_size=4)
    want = LLM(base, attention_backend="xla", **options).generate(prompts, params,
                                                                  use_tqdm=False)
    kernel = LLM(base, attention_backend=backend, **options)
    got = kernel.generate(prompts, params, use_tqdm=False)
    assert kernel.engine.stats().num_preemptions > 0
    assert _ids(got) == _ids(want)
    for a, b in zip(got, want, strict=True):
        assert abs(a.outputs[0].cumulative_logprob - b.outputs[0].cumulative_logprob) < 1e-4
