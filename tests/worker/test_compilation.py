"""Every program is compiled at start-up; no workload compiles anything after."""

import json
import subprocess
import sys
import textwrap

import jax
import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.sampling_params import MAX_LOGPROBS

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compile_events():
    events = []

    def listener(name, *_args, **_kwargs):
        if name == BACKEND_COMPILE:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def _varied_params(i: int) -> SamplingParams:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, seed=i),
        dict(temperature=1.0, top_k=5, seed=i),
        dict(temperature=0.7, top_p=0.8),
        dict(temperature=0.9, min_p=0.1, seed=i),
        dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.2),
        dict(temperature=0.0, repetition_penalty=1.3),
        dict(temperature=0.0, logprobs=3),
        dict(temperature=0.6, n=2, seed=i, logprobs=MAX_LOGPROBS),
    ]
    return SamplingParams(max_tokens=1 + i % 9, ignore_eos=True, **kinds[i % len(kinds)])


@pytest.mark.slow
def test_after_start_up_a_varied_workload_compiles_nothing(compile_events):
    ref = Reference("gqa")
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
              max_model_len=256, max_num_batched_tokens=64, num_kv_blocks=12, block_size=8,
              compile_on_start=True)
    stats = llm.engine.compile_stats()
    keys = llm.engine.core.runner.program_keys()
    # Token buckets 8, 16, 32, 64: sampling kinds and logprobs are flags, not programs.
    assert stats["programs_at_start"] == len(keys) == 4
    assert stats["warm_runs"] >= 3 * len(keys)  # each bucket ran its branches once
    assert llm.engine.core.runner.compiled_programs() == keys
    reqs = [None] + [LoRARequest(n, i + 1, ref.adapter_path(n))
                     for i, n in enumerate(ref.adapters)]
    long = LoRARequest("long", 9, ref.adapter_path(ref.adapters[0]), long_lora_max_len=256)
    compile_events.clear()
    for round_ in range(3):  # adapters churn through 2 slots, prompts of 1 to 60 tokens
        prompts, params, loras = [], [], []
        for i in range(12):
            length = 1 + (7 * i + 13 * round_) % 60
            prompts.append({"prompt_token_ids": (ref.prompt(i % 3) * 30)[:length]})
            params.append(_varied_params(i + round_))
            loras.append(long if (i + round_) % 11 == 0 else reqs[(i + round_) % len(reqs)])
        outs = llm.generate(prompts, params, loras, use_tqdm=False)
        assert all(o.error is None and o.finished for o in outs)
    # A tiny pool: some of those steps preempted and recomputed sequences.
    assert llm.engine.stats().num_preemptions > 0
    assert compile_events == []
    assert llm.engine.compile_stats()["compiled_after_start"] == 0


def test_warm_runs_at_start_up_change_no_output():
    """The warm runs write into the pool and sample into the history at start-up: an engine
    that ran them answers as one that did not, penalties, seeds, logprobs and adapters
    included."""
    ref = Reference("gqa")
    reqs = [None] + [LoRARequest(n, i + 1, ref.adapter_path(n))
                     for i, n in enumerate(ref.adapters)]
    prompts = [{"prompt_token_ids": (ref.prompt(i % 3) * 4)[:5 + 6 * i]} for i in range(9)]
    params = [_varied_params(i) for i in range(9)]
    loras = [reqs[i % len(reqs)] for i in range(9)]
    outs = []
    for warm in (True, False):
        llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
                  max_model_len=128, max_num_batched_tokens=64, compile_on_start=warm)
        assert (llm.engine.compile_stats()["warm_runs"] or 0) > 0 if warm else True
        for req in reqs[1:]:  # read now, not in the background: the same batches both times
            llm.add_lora(req)
        outs.append([[(c.token_ids, c.logprobs) for c in o.outputs]
                     for o in llm.generate(prompts, params, loras, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_without_compile_on_start_programs_compile_as_shapes_appear():
    ref = Reference("gqa")
    llm = LLM(ref.model, max_num_seqs=4, compile_on_start=False)
    assert llm.engine.core.runner.compiled_programs() == []
    llm.generate({"prompt_token_ids": ref.prompt(2)}, SamplingParams(temperature=0.0, max_tokens=3))
    # The prompt's bucket (16 tokens), then the decode steps' (8).
    compiled = llm.engine.core.runner.compiled_programs()
    assert [k.tokens for k in compiled] == [16, 8]
    assert set(compiled) <= set(llm.engine.core.runner.program_keys())


_START = textwrap.dedent("""
    import json, sys
    from lora_jax import LLM
    llm = LLM(sys.argv[1], max_num_seqs=4, max_num_batched_tokens=16, compile_on_start=True,
              compilation_cache_dir=sys.argv[2])
    print(json.dumps(llm.engine.compile_stats()))
""")


@pytest.mark.slow
def test_a_second_start_loads_every_program_from_the_persistent_cache(tmp_path):
    ref = Reference("gqa")
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _START, str(ref.model), str(tmp_path)],
                              capture_output=True, text=True, timeout=600, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["programs_at_start"] == second["programs_at_start"] == 2  # 8 and 16 tokens
    assert first["cache_dir"] == str(tmp_path) and any(tmp_path.iterdir())
    assert second["cache_hits"] >= second["programs_at_start"]
