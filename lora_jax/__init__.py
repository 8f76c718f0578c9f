"""lora-jax: multi-LoRA LLM serving, native to JAX.

`from lora_jax import LLM, SamplingParams, LoRARequest`. Only LoRARequest is imported eagerly:
the rest load JAX, and a client that only builds requests should not pay for that.
"""

import importlib

from lora_jax.request import LoRARequest

_LAZY = {
    "LLM": "lora_jax.entrypoints.llm",
    "SamplingParams": "lora_jax.sampling_params",
    "RequestOutput": "lora_jax.outputs",
    "CompletionOutput": "lora_jax.outputs",
    "LoRAAdapter": "lora_jax.lora.adapters",
    "load_adapter": "lora_jax.lora.adapters",
    "save_adapter": "lora_jax.lora.adapters",
}

__all__ = ["LoRARequest", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lora_jax' has no attribute {name!r}")
