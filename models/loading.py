"""Load a Hugging Face Llama (or a relative: models.families) folder (config.json +
safetensors, single or sharded) into `Llama`.

The model is built abstractly first (nnx.eval_shape). Each parameter is then allocated on the
device and filled in place, one tensor at a time read through safetensors' safe_open and
transposed and cast on the device: host memory holds about one tensor, never a second copy of
the weights (nor of one packed parameter).
"""

import contextlib
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from models.config import LlamaConfig
from models.families import layer_sources
from models.llama import Llama

SUPPORTED_DTYPES = ("float32", "bfloat16")
_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"

def resolve_dtype(dtype, config: LlamaConfig) -> str:
    """"auto" -> the checkpoint's torch_dtype; ValueError for dtypes we do not compute in."""
    if dtype == "auto":
        if config.torch_dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the checkpoint's torch_dtype {config.torch_dtype!r} is not "
                             f"supported; pass dtype as one of {SUPPORTED_DTYPES}")
        return config.torch_dtype
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use 'auto' or one of "
                         f"{SUPPORTED_DTYPES}")
    return name


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape ([d_out, d_in] for linear layers) that config.json implies."""
    d, v = config.hidden_size, config.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    proj = config.projection_shapes()
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for i in range(config.num_hidden_layers):
        for tensors in layer_sources(config).values():
            for tensor in tensors:
                module, kind = tensor.rsplit(".", 1)
                name = module.rsplit(".", 1)[-1]
                if name.endswith("norm"):
                    size = config.head_dim if name in ("q_norm", "k_norm") else d
                    shape = (size,)
                else:
                    d_in = proj[fused.get(name, (name,))[0]][0]
                    d_out = sum(proj[p][1] for p in fused.get(name, (name,)))
                    shape = (d_out,) if kind == "bias" else (d_out, d_in)
                shapes[f"model.layers.{i}.{tensor}"] = shape
    return shapes


def _ignorable(name: str, config: LlamaConfig) -> bool:
    # Old checkpoints carry RoPE buffers; tied ones sometimes still carry the lm_head copy.
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_word_embeddings)


def _shard_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    if (folder / _INDEX).is_file():
        with open(folder / _INDEX) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / _INDEX} has no 'weight_map'")
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise FileNotFoundError(f"shard(s) {missing} named in {_INDEX} are not in {folder}")
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / _SINGLE).is_file():
        with safe_open(folder / _SINGLE, framework="np") as f:
            return dict.fromkeys(f.keys(), folder / _SINGLE)
    raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in model folder {str(folder)!r} "
                            "(only safetensors checkpoints are supported)")


class _Reader:
    """Shapes from the shards' headers (opened lazily), and one tensor at a time."""

    def __init__(self, files: dict[str, Path], stack: contextlib.ExitStack):
        self.files, self._stack, self._open = files, stack, {}

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="np"))
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        # Opened for this one read: a mapped file's touched pages count in the process's RSS
        # until it is closed, which over a whole load is the whole checkpoint.
        with safe_open(self.files[name], framework="np") as f:
            return f.get_tensor(name)


def _check_names_and_shapes(reader: _Reader, config: LlamaConfig, folder: Path) -> None:
    expected = expected_tensors(config)
    names = set(reader.files)
    missing = sorted(set(expected) - names)
    unexpected = sorted(n for n in names - set(expected) if not _ignorable(n, config))
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for name in sorted(set(expected) & names):
        if reader.shape(name) != expected[name]:
            problems.append(f"tensor {name!r} has shape {list(reader.shape(name))}, "
                            f"config.json implies {list(expected[name])}")
    if problems:
        raise ValueError(f"checkpoint in {str(folder)!r} does not match its config.json: "
                         + "; ".join(problems))


@functools.partial(jax.jit, donate_argnums=0)
def _place(param: jax.Array, tensor: jax.Array, offset: jax.Array) -> jax.Array:
    """HF tensor [d_out, d_in] (or a [d_out] bias or norm) -> param[offset:] (rows: packed
    outputs)."""
    start = (offset,) + (0,) * (tensor.ndim - 1)
    return jax.lax.dynamic_update_slice(param, tensor.astype(param.dtype), start)


def _packed(reader: _Reader, layer: int, param: str, shape, dtype) -> jax.Array:
    """One layer's parameter on the device, filled from its HF tensors one at a time."""
    out, offset = jnp.zeros(shape, dtype), 0
    for source in layer_sources(reader.config)[param]:
        tensor = reader.get(f"model.layers.{layer}.{source}")
        out = _place(out, tensor, jnp.int32(offset))
        offset += tensor.shape[0]
    return out


def load_llama(folder: str | Path, dtype: str = "auto") -> Llama:
    """A Hugging Face Llama folder -> `Llama` with weights in `dtype` ("auto" = torch_dtype).

    FileNotFoundError for a missing config or weights; ValueError naming every missing,
    unexpected or misshapen tensor.
    """
    folder = Path(folder)
    config = LlamaConfig.from_pretrained(folder)
    dtype = resolve_dtype(dtype, config)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    with contextlib.ExitStack() as stack:
        reader = _Reader(_shard_files(folder), stack)
        reader.config = config
        _check_names_and_shapes(reader, config, folder)
        for i, layer in enumerate(model.layers):
            for param in layer_sources(config):
                variable = getattr(layer, param)
                variable.set_value(_packed(reader, i, param, variable.get_value().shape, dtype))
        model.embed.set_value(jnp.asarray(reader.get("model.embed_tokens.weight")).astype(dtype))
        model.norm.set_value(jnp.asarray(reader.get("model.norm.weight")).astype(dtype))
        if model.lm_head is not None:
            model.lm_head.set_value(jnp.asarray(reader.get("lm_head.weight")).astype(dtype))
    return model
