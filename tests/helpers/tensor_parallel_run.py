"""Run the gqa reference workload at several tensor-parallel sizes on forced CPU devices.

`python tensor_parallel_run.py '{"sizes": [1, 2, 4], ...}'` prints one JSON object: per size,
the outputs (token ids, logprobs), engine stats, compile stats and the shard shapes of the
split arrays. A subprocess because the device count must be set before JAX is imported.
"""

import dataclasses
import gc
import json
import os
import sys

DEVICES = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}")

from helpers.fixtures import Reference  # noqa: E402
from lora_jax import LLM, LoRARequest, SamplingParams  # noqa: E402
from lora_jax.worker.memory import whole_arrays  # noqa: E402


def _shards(array) -> dict:
    return {"global": list(array.shape),
            "shards": sorted([list(s.data.shape), s.device.id]
                             for s in array.addressable_shards)}


def shard_shapes(llm: LLM) -> dict:
    engine = llm.engine.core
    layer0 = engine.runner.state["layers"][0]
    out = {name: _shards(layer0[name].get_value()) for name in ("qkv", "o", "gate_up", "down")}
    for name in ("embed", "lm_head"):
        if name in engine.runner.state:  # no lm_head when tied to the embedding
            out[name] = _shards(engine.runner.state[name].get_value())
    out["kv_k"] = _shards(engine.runner.kv.k)
    lora = engine.adapters.stacks.layers[0]
    for name in ("qkv_a", "q_b", "k_b", "o_a", "o_b", "gate_b", "down_a"):
        out[f"lora_{name}"] = _shards(getattr(lora, name))
    return out


def run(size: int, spec: dict) -> dict:
    gc.collect()  # the previous size's engine leaves nothing on the devices this one counts
    ref = Reference(spec.get("variant", "gqa"))
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
              tensor_parallel_size=size, num_kv_blocks=spec["num_kv_blocks"], block_size=8,
              max_num_batched_tokens=32, max_model_len=64,
              compile_on_start=spec["compile_on_start"],
              lora_backend=spec.get("lora_backend"),
              attention_backend=spec.get("attention_backend"))
    reqs = {"base": None, **{n: LoRARequest(n, i + 1, ref.adapter_path(n))
                             for i, n in enumerate(ref.adapters)}}
    cases = [(name, j) for j in range(spec.get("num_prompts", ref.num_prompts))
             for name in reqs]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=2)
    rounds = []
    for _ in range(spec["rounds"]):  # a second round of the same prompts hits the prefix cache
        outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases], params,
                            [reqs[name] for name, _ in cases], use_tqdm=False)
        rounds.append([{"case": [name, j], "tokens": o.outputs[0].token_ids,
                        "logprobs": [lp[t] for lp, t in zip(o.outputs[0].logprobs,
                                                            o.outputs[0].token_ids,
                                                            strict=True)],
                        "reference": ref.greedy(name, j)[:spec["max_tokens"]]}
                       for (name, j), o in zip(cases, outs, strict=True)])
    result = {"rounds": rounds, "stats": dataclasses.asdict(llm.engine.stats()),
              "compile": llm.engine.compile_stats()}
    if size > 1:
        result["shards"] = shard_shapes(llm)
        engine = llm.engine.core
        result["whole"] = whole_arrays(
            {"model": engine.runner.state, "lora": engine.adapters.stacks, "kv": engine.runner.kv,
             "history": engine.runner.history, "carry": engine.runner.carry}, min_elements=256)
    return result


def error_of(size: int) -> str | None:
    """The message LLM(...) raises for this size, or None when it starts."""
    try:
        LLM(Reference("gqa").model, tensor_parallel_size=size)
    except ValueError as err:
        return str(err)
    return None


def main() -> None:
    spec = json.loads(sys.argv[1])
    if "variants" in spec:  # one size, several fixture variants (the model families)
        print(json.dumps({v: run(spec["sizes"][0], {**spec, "variant": v})
                          for v in spec["variants"]}))
        return
    out = {str(size): run(size, spec) for size in spec["sizes"]}
    out["errors"] = {str(size): error_of(size) for size in spec.get("errors", [])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
