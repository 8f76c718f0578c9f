"""TP = 1 on a one-device mesh: the split code path (layouts, shardings, out_shardings, slot
fills through the layout) gives what the unsplit path gives, on whatever device runs the tests
(scripts/gpu_check.sh runs this file on the GPU)."""

import math

import jax
import numpy as np
import pytest
from helpers.fixtures import Reference
from jax.sharding import Mesh, NamedSharding

from lora_jax import LLM, LoRARequest, SamplingParams
from lora_jax.worker.mesh import make_mesh

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


def _generate(ref: Reference, **options):
    # The dense LoRA path on both sides: the split path uses it (the Pallas kernels are not
    # under shard_map yet), so the comparison is of the split itself.
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
              lora_backend="dense", **options)
    reqs = [None] + [LoRARequest(n, i + 1, ref.adapter_path(n))
                     for i, n in enumerate(ref.adapters)]
    cases = [(r, j) for j in range(ref.num_prompts) for r in reqs]
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], PARAMS,
                        [r for r, _ in cases], use_tqdm=False)
    return llm, cases, [o.outputs[0] for o in outs]


def test_one_device_mesh_gives_the_unsplit_tokens_and_logprobs():
    ref = Reference("gqa")
    _, cases, whole = _generate(ref)
    llm, _, split = _generate(ref, mesh=make_mesh(1))
    assert isinstance(llm.engine.core.runner.kv.k.sharding, NamedSharding)
    for (req, j), a, b in zip(cases, split, whole, strict=True):
        assert a.token_ids == b.token_ids == ref.greedy(req.lora_name if req else "base", j)
        for lp_a, lp_b in zip(a.logprobs, b.logprobs, strict=True):
            assert lp_a.keys() == lp_b.keys()
            assert all(math.isclose(lp_a[t], lp_b[t], abs_tol=1e-4) for t in lp_a)


def test_a_mesh_without_a_tp_axis_or_of_another_size_is_refused():
    ref = Reference("gqa")
    devices = np.asarray(jax.devices()[:1])
    with pytest.raises(ValueError, match="needs one named 'tp'"):
        LLM(ref.model, mesh=Mesh(devices, ("dp",)))
    with pytest.raises(ValueError, match="tensor_parallel_size 2 differs from the mesh's 'tp' "
                                         "axis of 1"):
        LLM(ref.model, mesh=Mesh(devices, ("tp",)), tensor_parallel_size=2)
