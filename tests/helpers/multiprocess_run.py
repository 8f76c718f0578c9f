"""One process of a two-process, TP=4 engine on forced CPU devices (2 per process).

`python multiprocess_run.py PORT PROCESS_ID` runs the gqa reference workload (the base and
every adapter over every prompt, 2 adapter slots); process 0 prints the outputs as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

from helpers.fixtures import Reference  # noqa: E402
from lora_jax import LLM, LoRARequest, SamplingParams  # noqa: E402


def main() -> None:
    port, process_id = int(sys.argv[1]), int(sys.argv[2])
    ref = Reference("gqa")
    llm = LLM(ref.model, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
              tensor_parallel_size=4, coordinator_address=f"127.0.0.1:{port}",
              num_processes=2, process_id=process_id, max_num_batched_tokens=32)
    reqs = {"base": None, **{n: LoRARequest(n, i + 1, ref.adapter_path(n))
                             for i, n in enumerate(ref.adapters)}}
    cases = [(name, j) for j in range(ref.num_prompts) for name in reqs]
    outs = llm.generate([{"prompt_token_ids": ref.prompt(j)} for _, j in cases],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        [reqs[name] for name, _ in cases], use_tqdm=False)
    llm.close()
    if process_id == 0:
        print(json.dumps([{"case": [name, j], "tokens": o.outputs[0].token_ids,
                           "reference": ref.greedy(name, j)}
                          for (name, j), o in zip(cases, outs, strict=True)]))
    else:
        print(json.dumps({"follower_outputs": len(outs)}))


if __name__ == "__main__":
    main()
