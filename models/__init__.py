"""A Llama in Flax NNX that serves many LoRA adapters in one batch.

    LlamaConfig            config.json, validated (config.py)
    Llama, forward         the model and its pure forward (llama.py)
    load_llama             a Hugging Face model folder -> Llama (loading.py)
    KVCache, init_kv_cache, init_paged_kv_cache: the KV block pool (kv_cache.py)
    LoraStacks, LayerLora, init_lora_stacks, pack_adapter, set_slot   adapter slots (lora.py)
"""

from models.config import PROJECTIONS, LlamaConfig
from models.kv_cache import KVCache, init_kv_cache, init_paged_kv_cache
from models.llama import Llama, forward
from models.loading import load_llama
from models.lora import LayerLora, LoraStacks, init_lora_stacks, pack_adapter, set_slot

__all__ = [
    "PROJECTIONS",
    "KVCache",
    "LayerLora",
    "Llama",
    "LlamaConfig",
    "LoraStacks",
    "forward",
    "init_kv_cache",
    "init_paged_kv_cache",
    "init_lora_stacks",
    "load_llama",
    "pack_adapter",
    "set_slot",
]
