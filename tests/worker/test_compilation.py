"""Recompilation is the enemy of jit serving: shapes are bucketed, adapters are arguments."""

import jax
import pytest
from helpers.fixtures import Reference

from lora_jax import LLM, LoRARequest, SamplingParams

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


def _workload(ref, reqs, rotation):
    """Mixed prompt lengths, batch sizes and adapters, in an order set by `rotation`."""
    prompts, loras = [], []
    for i in range(9):
        length = 3 + (5 * i + rotation) % 17
        prompts.append({"prompt_token_ids": (ref.prompt(i % 3) * 4)[:length]})
        loras.append(reqs[(i + rotation) % len(reqs)])
    return prompts, loras


def test_adapter_churn_compiles_only_one_program_per_shape_bucket(compile_events):
    ref = Reference("gqa")
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8)
    reqs = [None] + [LoRARequest(n, i + 1, ref.adapter_path(n))
                     for i, n in enumerate(ref.adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    runner, slots = llm.engine.runner, llm.engine.slots
    # jit caches per function, so other models in this process may have filled set_slot's.
    fills_before = slots._set._cache_size()

    prompts, loras = _workload(ref, reqs, 0)
    llm.generate(prompts, params, loras, use_tqdm=False)
    assert runner.compiled_count() == len(runner.shapes_run)
    fills = slots._set._cache_size()
    assert fills <= fills_before + 1  # every slot fill reuses one program
    buckets = set(runner.shapes_run)

    compile_events.clear()
    for rotation in (1, 2, 3):  # same buckets, different adapters in different slots
        prompts, loras = _workload(ref, reqs, rotation)
        llm.generate(prompts, params, loras, use_tqdm=False)
    new_buckets = runner.shapes_run - buckets
    assert runner.compiled_count() == len(runner.shapes_run)
    assert len(compile_events) == len(new_buckets)
    assert slots._set._cache_size() == fills
