"""The benchmark's peer: the same workload through transformers + PEFT mixed-adapter batches.

It gets what lora-jax gets: a warm-up run first; then the better of two timed runs.

Needs the `reference` extra (torch, transformers, peft). The adapters are the benchmark's own
random adapters, saved in the PEFT format, so both sides compute the same function.
"""

import tempfile
import time
from pathlib import Path

import numpy as np

from lora_jax.lora.adapters import save_adapter


def run_peft(model_dir: str, args, num_adapters: int) -> dict:
    """The benchmark workload through PeftModel.generate(adapter_names=...): greedy, or
    sampled with the benchmark's temperature and top-p."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from lora_jax.tools.workload import random_adapter, workload
    from models import LlamaConfig
    from models.loading import resolve_dtype

    config = LlamaConfig.from_pretrained(model_dir)
    dtype = getattr(torch, resolve_dtype(args.dtype, config))
    prompts, loras = workload(args, num_adapters, config.vocab_size)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    names = ["__base__" if r is None else f"a{r.lora_int_id}" for r in loras]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(num_adapters):
            folder = save_adapter(random_adapter(config, args.rank, seed=i), Path(tmp) / f"a{i}")
            if i == 0:
                model = PeftModel.from_pretrained(model, folder, adapter_name="a1")
            else:
                model.load_adapter(folder, adapter_name=f"a{i + 1}")
        ids = torch.tensor(np.array([p["prompt_token_ids"] for p in prompts]))
        kwargs = dict(do_sample=False, pad_token_id=0)
        if args.temperature > 0:  # the same sampling as lora-jax's side of the benchmark
            kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p,
                          top_k=0)

        def generate(new_tokens: int) -> int:
            generated = 0
            with torch.inference_mode():
                for lo in range(0, len(prompts), args.max_num_seqs):
                    batch = ids[lo:lo + args.max_num_seqs]
                    extra = ({"adapter_names": names[lo:lo + args.max_num_seqs]}
                             if num_adapters else {})
                    out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         **kwargs, **extra)
                    generated += (out.shape[1] - batch.shape[1]) * batch.shape[0]
            return generated

        generate(4)  # warm-up, as lora-jax gets one: first-call allocation and kernel setup
        # The better of two timed runs: torch's speed on this shared machine varies run to run,
        # and the comparison should not profit from the peer's bad luck.
        elapsed = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            generated = generate(args.output_len)
            elapsed = min(elapsed, time.perf_counter() - start)
    return {"generated_tokens": generated, "seconds": round(elapsed, 3),
            "tokens_per_s": round(generated / elapsed, 2)}
