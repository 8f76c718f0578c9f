"""Engine set-up: where the model comes from, how big the KV pool is, and the device mesh."""

from dataclasses import dataclass
from pathlib import Path

from lora_jax.config import EngineConfig
from lora_jax.tokenizer import TextTokenizer
from lora_jax.worker.mesh import check_mesh, make_mesh
from models import load_llama
from models.config import LlamaConfig
from models.kv_cache import kv_bytes_per_token
from models.sharding import TensorParallel

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
    """The model, its tokenizer (None without a tokenizer.json) and the facts taken from it."""

    path: Path
    model: object  # models.Llama
    tokenizer: TextTokenizer | None
    max_model_len: int
    eos_ids: frozenset[int]

    @property
    def config(self) -> LlamaConfig:
        return self.model.config


def load_model(config: EngineConfig) -> LoadedModel:
    path = resolve_model_path(config.model)
    model = load_llama(path, dtype=config.dtype)
    mc = model.config
    tok_path = Path(config.tokenizer) if config.tokenizer else path
    tokenizer = (TextTokenizer(tok_path, mc.bos_token_id)
                 if config.tokenizer or (tok_path / "tokenizer.json").is_file() else None)
    eos = {mc.eos_token_id} if isinstance(mc.eos_token_id, int) else set(mc.eos_token_id or ())
    return LoadedModel(path, model, tokenizer, config.max_model_len or mc.max_position_embeddings,
                       frozenset(eos))


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


def tensor_parallel(config: EngineConfig, model_config: LlamaConfig,
                    mesh) -> tuple[TensorParallel | None, str | None]:
    """The model's split over `mesh` (made from tensor_parallel_size when None and that is
    above 1), and the LoRA backend that goes with it."""
    lora_backend = config.lora_backend
    if mesh is None and config.tensor_parallel_size > 1:
        mesh = make_mesh(config.tensor_parallel_size, model_config)
    if mesh is None:
        return None, lora_backend
    check_mesh(mesh, config.tensor_parallel_size, model_config)
    # The Pallas kernels are not wrapped in shard_map yet; the dense path splits.
    return TensorParallel(model_config, mesh), lora_backend or "dense"
