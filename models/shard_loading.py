"""Load a Hugging Face Llama straight into its tensor-parallel shards.

Each parameter of the split model (models.sharding) is assembled from single-device arrays:
for every device this process drives, the callback reads from safetensors only the slice that
device holds (`get_slice`), builds that shard's packed q|k|v or gate|up rows, casts it on the
host and hands it to its device. No device and no host buffer ever holds a whole model: the
host holds one device's shard of one parameter at a time, and the checkpoint files are opened
per shard, because a memory-mapped file's touched pages count in the process's RSS until the
file is closed.

With several processes each one reads only its own devices' slices.
"""

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from models.config import LlamaConfig
from models.families import layer_sources
from models.llama import Llama
from models.loading import _check_names_and_shapes, _Reader, _shard_files, resolve_dtype
from models.sharding import TensorParallel

_TOP = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
        "lm_head": "lm_head.weight"}  # lm_head is None when tied: the embedding serves


class _Slices:
    """The files holding `names`, open only while one device's shard is read: a file's mapped
    pages count in this process's RSS until it is closed (see the module doc)."""

    def __init__(self, files: dict[str, Path], names: list[str]):
        self.files, self.names = files, names

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        paths = {self.files[n] for n in self.names}
        handles = {p: self._stack.enter_context(safe_open(p, framework="np")) for p in paths}
        self.slices = {n: handles[self.files[n]].get_slice(n) for n in self.names}
        return self

    def __exit__(self, *exc):
        self.slices = None
        self._stack.close()

    def read(self, name: str, index: tuple) -> np.ndarray:
        return self.slices[name][index]


def _rows_of(shard: int, per: int, repeat: int, head_dim: int) -> tuple[slice, np.ndarray | None]:
    """A kv projection's rows for `shard` of a split with `per` (repeated) kv heads each:
    the rows of the checkpoint heads it covers, and which of them each repeated head takes
    (None when no head repeats)."""
    heads = np.arange(shard * per, (shard + 1) * per) // repeat
    lo, hi = int(heads[0]), int(heads[-1]) + 1
    rows = slice(lo * head_dim, hi * head_dim)
    return rows, (None if repeat == 1 else heads - lo)


def _parts(names: list[str], widths: list[int]) -> list[tuple[str, int]]:
    """A packed parameter's parts as (tensor, first row in it): one tensor per part, or one
    fused tensor (Phi-3's qkv_proj, gate_up_proj) holding the parts one after another."""
    if len(names) == len(widths):
        return [(name, 0) for name in names]
    starts = np.cumsum([0, *widths[:-1]]).tolist()
    return [(names[0], int(start)) for start in starts]


def _rows(src: _Slices, part: tuple[str, int], rows: slice) -> np.ndarray:
    """Rows `rows` of one part (a weight [rows, D] or a bias [rows])."""
    name, start = part
    return src.read(name, (slice(start + rows.start, start + rows.stop),))


def _qkv_shard(src: _Slices, names: list[str], tp: TensorParallel, shard: int) -> np.ndarray:
    """Shard `shard`'s rows of the packed q|k|v (or of its bias): its q heads, then its k and
    v heads (repeated where the split has more shards than kv heads)."""
    c, split = tp.base_config, tp.config
    hd, n = c.head_dim, tp.size
    q_rows, kv_rows = c.num_attention_heads * hd, c.num_key_value_heads * hd
    q, k, v = _parts(names, [q_rows, kv_rows, kv_rows])
    per = q_rows // n
    out = [_rows(src, q, slice(shard * per, (shard + 1) * per))]
    rows, pick = _rows_of(shard, split.num_key_value_heads // n, tp.kv_repeat, hd)
    for part in (k, v):
        w = _rows(src, part, rows)
        if pick is not None:
            w = w.reshape(-1, hd, *w.shape[1:])[pick].reshape(-1, *w.shape[1:])
        out.append(w)
    return np.concatenate(out, axis=0)


def _gate_up_shard(src: _Slices, names: list[str], tp: TensorParallel, shard: int) -> np.ndarray:
    inter = tp.base_config.intermediate_size
    per = inter // tp.size
    rows = slice(shard * per, (shard + 1) * per)
    return np.concatenate([_rows(src, part, rows)
                           for part in _parts(names, [inter, inter])], axis=0)


# Packed parameters: split over their rows in the shard-major layout of models.sharding.
_PACKED = {"qkv": _qkv_shard, "qkv_bias": _qkv_shard, "gate_up": _gate_up_shard}


def _param(files: dict[str, Path], names: list[str], param: str, shape: tuple[int, ...],
           tp: TensorParallel, dtype) -> jax.Array:
    """One parameter of the split model, each device's shard read and placed on its own (the
    host holds one shard at a time; jax.make_array_from_callback would hold them all).

    A packed parameter (q|k|v and its bias, gate|up) is split over its rows; its shard number
    follows from the rows a device holds. Any other parameter's device index is the
    checkpoint's own (replicated ones, the norms, read whole: a few KiB each).
    """
    sharding = tp.param_sharding(param)
    np_dtype = jnp.dtype(dtype)
    pieces = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        with _Slices(files, names) as src:
            if param in _PACKED:
                rows = index[0].start or 0
                host = _PACKED[param](src, names, tp, rows // (shape[0] // tp.size))
            else:
                host = src.read(names[0], index)
        pieces.append(jax.device_put(np.ascontiguousarray(host.astype(np_dtype, copy=False)),
                                     device))
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def load_llama_sharded(folder: str | Path, tp: TensorParallel, dtype: str = "auto") -> Llama:
    """A Hugging Face folder of any family (models.families) -> the `Llama` of tp's split
    (tp.config), every parameter placed in its shards as it is read: q|k|v biases split with
    their columns, norms replicated, the embedding (also the tied lm_head) split over the
    vocabulary. Same errors as models.loading.load_llama."""
    folder = Path(folder)
    config = LlamaConfig.from_pretrained(folder)
    if config != tp.base_config:
        raise ValueError(f"the tensor-parallel split was made for another config than "
                         f"{str(folder)!r}'s config.json")
    dtype = resolve_dtype(dtype, config)
    model = nnx.eval_shape(lambda: Llama(tp.config, dtype=dtype, rngs=nnx.Rngs(0)))
    files = _shard_files(folder)
    with contextlib.ExitStack() as stack:  # headers only: no tensor data is touched
        _check_names_and_shapes(_Reader(files, stack), config, folder)
    for i, layer in enumerate(model.layers):
        for param, sources in layer_sources(config).items():
            variable = getattr(layer, param)
            names = [f"model.layers.{i}.{source}" for source in sources]
            variable.set_value(_param(files, names, param, variable.get_value().shape, tp,
                                      dtype))
    for param, name in _TOP.items():
        variable = getattr(model, param)
        if variable is not None:
            variable.set_value(_param(files, [name], param, variable.get_value().shape, tp,
                                      dtype))
    return model
