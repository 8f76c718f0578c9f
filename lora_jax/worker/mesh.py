"""The device mesh a tensor-parallel engine runs on: N devices along a "tp" axis."""

from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from models.config import LlamaConfig
from models.sharding import TP, TensorParallel, check_divisible

FORCE_DEVICES = "--xla_force_host_platform_device_count"


def make_mesh(tensor_parallel_size: int, config: LlamaConfig | None = None,
              devices=None) -> Mesh:
    """A Mesh over the first `tensor_parallel_size` of `devices` (default jax.devices()) with
    one axis "tp". ValueError naming the fix for a size the devices or the model cannot take."""
    n = tensor_parallel_size
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if n > len(devices):
        hint = (f"; on CPU, set XLA_FLAGS={FORCE_DEVICES}={n} before JAX is imported to "
                "split the host into that many devices"
                if devices and devices[0].platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size {n} is above the {len(devices)} "
                         f"{devices[0].platform if devices else ''} device(s) JAX sees; give at "
                         f"most {len(devices)}{hint}")
    chosen = devices[:n]
    kinds = sorted({d.device_kind for d in chosen})
    if len(kinds) > 1:
        raise ValueError(f"tensor parallelism needs devices of one kind, got {kinds}; make "
                         "only one kind visible (e.g. CUDA_VISIBLE_DEVICES)")
    if config is not None:
        check_divisible(config, n)
    return Mesh(np.asarray(chosen), (TP,))


def check_mesh(mesh: Mesh, tensor_parallel_size: int, config: LlamaConfig) -> None:
    """A mesh given by the caller: it needs a "tp" axis of tensor_parallel_size (or any size
    when tensor_parallel_size is left at 1) that splits the model evenly."""
    if TP not in mesh.shape:
        raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)}; tensor parallelism "
                         f"needs one named {TP!r} (see lora_jax.worker.mesh.make_mesh)")
    size = mesh.shape[TP]
    if tensor_parallel_size not in (1, size):
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} differs from the mesh's "
                         f"{TP!r} axis of {size}; give one or the other")
    check_divisible(config, size)


def tensor_parallel_for(model_folder: str | Path, tensor_parallel_size: int,
                        mesh: Mesh | None = None) -> TensorParallel | None:
    """The split of the model in `model_folder` over `mesh` (or over a new mesh of
    tensor_parallel_size devices); None for one device and no mesh. Made from config.json
    alone, before any weight is read, so the weights can be read into their shards."""
    if mesh is None and tensor_parallel_size == 1:
        return None
    config = LlamaConfig.from_pretrained(model_folder)
    if mesh is None:
        mesh = make_mesh(tensor_parallel_size, config)
    check_mesh(mesh, tensor_parallel_size, config)
    return TensorParallel(config, mesh)
