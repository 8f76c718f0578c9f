"""Load a tiny sharded checkpoint into tensor-parallel shards on 4 forced CPU devices.

`python shard_loading_run.py FOLDER [FAMILY_FOLDER ...]` prints one JSON object: per tp size and
dtype, whether every split parameter equals the checkpoint's weights laid out for that split
(built here with numpy from the unsplit load), and the shard shapes each device holds; each
FAMILY_FOLDER (a models.families checkpoint) at tp 2 and 4 in float32, keyed by its folder's
parent's name. A subprocess because the device count must be set before JAX is imported.
"""

import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lora_jax.worker.mesh import make_mesh  # noqa: E402
from models import (  # noqa: E402
    LlamaConfig,
    load_llama,
    shard_loading,  # noqa: E402
)
from models.shard_loading import load_llama_sharded  # noqa: E402
from models.sharding import TensorParallel, interleave  # noqa: E402


def expected(whole: dict, c: LlamaConfig, tp: int) -> dict:
    """The split layout from the unsplit weights: q|k|v (and its bias) and gate|up
    shard-major, kv heads repeated up to tp; everything else as stored."""
    out = dict(whole)
    hd, repeat = c.head_dim, max(1, tp // c.num_key_value_heads)
    for key in [k for k in whole if "['qkv']" in k or "['qkv_bias']" in k]:
        w = (whole[key] if whole[key].ndim == 2 else whole[key][:, None]).T  # [D, (H+2KV) hd]
        q, k, v = np.split(w, [c.num_attention_heads * hd,
                               (c.num_attention_heads + c.num_key_value_heads) * hd], -1)
        k, v = (np.repeat(x.reshape(x.shape[0], -1, hd), repeat, 1).reshape(x.shape[0], -1)
                for x in (k, v))
        packed = interleave([q, k, v], tp).T
        out[key] = packed if whole[key].ndim == 2 else packed[:, 0]  # a bias: one column
    for key in [k for k in whole if "['gate_up']" in k]:
        out[key] = interleave(np.split(whole[key].T, 2, -1), tp).T
    return out


def flat(model) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def run(folder: Path, tp_size: int, dtype: str) -> dict:
    whole = {k: np.asarray(v, np.float32) for k, v in flat(load_llama(folder, dtype)).items()}
    config = LlamaConfig.from_pretrained(folder)
    tp = TensorParallel(config, make_mesh(tp_size, config))
    reads = []
    read = shard_loading._Slices.read
    shard_loading._Slices.read = lambda self, name, index: _record(reads, read(self, name, index))
    try:
        split = flat(load_llama_sharded(folder, tp, dtype))
    finally:
        shard_loading._Slices.read = read
    want = expected(whole, config, tp_size)
    return {"equal": {k: bool(np.array_equal(np.asarray(v, np.float32), want[k]))
                      for k, v in split.items()},
            "shards": {k: sorted([list(s.data.shape), s.device.id] for s in v.addressable_shards)
                       for k, v in split.items()},
            "global": {k: list(v.shape) for k, v in split.items()},
            "dtype": {k: str(v.dtype) for k, v in split.items()},
            "largest_read_bytes": max(reads),
            "largest_param_bytes": max(v.nbytes for v in whole.values())}


def _record(reads: list, array: np.ndarray) -> np.ndarray:
    reads.append(array.nbytes)
    return array


def main() -> None:
    folder = Path(sys.argv[1])
    out = {f"{tp}-{dtype}": run(folder, tp, dtype)
           for tp in (2, 4) for dtype in ("float32", "bfloat16")}
    for family in map(Path, sys.argv[2:]):
        out.update({f"{family.parent.name}-{tp}": run(family, tp, "float32") for tp in (2, 4)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
