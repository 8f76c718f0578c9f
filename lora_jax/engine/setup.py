"""Engine set-up: where the model comes from, how big the KV pool is, and the device mesh."""

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_jax.config import EngineConfig
from lora_jax.tokenizer import TextTokenizer
from lora_jax.worker.memory import LoadMemory
from lora_jax.worker.mesh import tensor_parallel_for
from models import load_llama
from models.config import LlamaConfig
from models.kv_cache import kv_bytes_per_token
from models.shard_loading import load_llama_sharded
from models.sharding import TensorParallel
from models.tp_kernels import attention_runs_pallas, lora_runs_pallas
from pallas_kernels import default_backend

logger = logging.getLogger("lora_jax")

# The CPU default pool: what max_num_seqs full-length sequences need, at most this.
DEFAULT_KV_CACHE_BYTES = 4 << 30


def resolve_model_path(model: str) -> Path:
    """A local Hugging Face model folder, else a Hub id fetched with huggingface_hub."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=[
            "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"]))
    except Exception as err:  # offline, not found, invalid id, gated
        raise FileNotFoundError(f"model {model!r} is not a local folder, and fetching it as a "
                                f"Hub repo id failed: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class LoadedModel:
    """The model, its tokenizer (None without a tokenizer.json) and the facts taken from it.
    config is the checkpoint's (a split model's own repeats kv heads for its shards)."""

    path: Path
    model: object  # models.Llama
    config: LlamaConfig
    tokenizer: TextTokenizer | None
    max_model_len: int
    eos_ids: frozenset[int]
    tensor_parallel: TensorParallel | None  # the split over a mesh, None on one device
    memory: LoadMemory  # host and device memory since loading began


def load_model(config: EngineConfig, mesh=None) -> LoadedModel:
    """The model of config.model, on one device or (tensor_parallel_size > 1 or a `mesh`)
    read straight into its shards: no whole copy on any device or in host memory."""
    path = resolve_model_path(config.model)
    tp = tensor_parallel_for(path, config.tensor_parallel_size, mesh)
    memory = LoadMemory()
    model = (load_llama(path, dtype=config.dtype) if tp is None else
             load_llama_sharded(path, tp, dtype=config.dtype))
    memory.loaded()
    mc = model.config if tp is None else tp.base_config
    tok_path = Path(config.tokenizer) if config.tokenizer else path
    tokenizer = (TextTokenizer(tok_path, mc.bos_token_id)
                 if config.tokenizer or (tok_path / "tokenizer.json").is_file() else None)
    eos = {mc.eos_token_id} if isinstance(mc.eos_token_id, int) else set(mc.eos_token_id or ())
    return LoadedModel(path, model, mc, tokenizer,
                       config.max_model_len or mc.max_position_embeddings, frozenset(eos), tp,
                       memory)


def pool_blocks(config: EngineConfig, model_config: LlamaConfig, dtype,
                max_model_len: int) -> int:
    """The pool's size: num_kv_blocks, or kv_cache_memory_bytes over one block's bytes,
    or by default what max_num_seqs full-length sequences need, up to 4 GiB."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_token(model_config, dtype) * config.block_size
    wanted = config.kv_cache_memory_bytes or min(
        DEFAULT_KV_CACHE_BYTES, config.max_num_seqs * max_model_len * per_block
        // config.block_size)
    blocks = wanted // per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_memory_bytes={wanted} is below one KV block of "
                         f"{per_block} bytes (block_size {config.block_size}); give more")
    return int(blocks)


def lora_backend_for(config: EngineConfig, tp: TensorParallel | None) -> str | None:
    """The LoRA backend to run (None: the platform's default). Every backend runs split: the
    Pallas ones per device under shard_map (models.tp_kernels), the plain-XLA ones (tiled,
    dense, reference) split by GSPMD. With a split the choice is logged."""
    if tp is not None:
        lora = config.lora_backend or default_backend()
        how = "per device under shard_map" if lora_runs_pallas(lora) else "split by GSPMD"
        attention = ("Pallas per device under shard_map"
                     if attention_runs_pallas(config.attention_backend) else "XLA split by GSPMD")
        logger.info("tensor parallel over %d devices: LoRA backend %r %s; attention %s",
                    tp.size, lora, how, attention)
    return config.lora_backend
