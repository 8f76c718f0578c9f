"""make_mesh: the tensor-parallel mesh, and the errors that name the fix."""

from types import SimpleNamespace

import jax
import pytest

from lora_jax.config import EngineConfig
from lora_jax.worker.mesh import make_mesh
from models.config import LlamaConfig


def _config(heads=4, kv_heads=2, intermediate=64) -> LlamaConfig:
    return LlamaConfig(hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                       vocab_size=16)


def test_one_device_mesh_has_a_tp_axis_of_size_one():
    mesh = make_mesh(1, _config())
    assert mesh.axis_names == ("tp",) and mesh.shape["tp"] == 1
    assert list(mesh.devices.flat) == jax.devices()[:1]


def test_size_above_the_device_count_is_refused_with_the_cpu_flag_to_set():
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 is above the 1 cpu device") as e:
        make_mesh(2, devices=jax.devices("cpu")[:1])
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in str(e.value)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_size_that_is_not_a_positive_int_is_refused(size):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        make_mesh(size)


def test_devices_of_different_kinds_are_refused():
    devices = [SimpleNamespace(platform="gpu", device_kind="NVIDIA H100"),
               SimpleNamespace(platform="gpu", device_kind="NVIDIA A100")]
    with pytest.raises(ValueError, match="devices of one kind.*CUDA_VISIBLE_DEVICES"):
        make_mesh(2, devices=devices)


@pytest.mark.parametrize("config, message", [
    (_config(heads=6, kv_heads=2), "does not divide the model's 6 attention heads"),
    (_config(intermediate=66), "does not divide the model's intermediate size 66"),
    (_config(heads=12, kv_heads=3), "neither divides the model's 3 kv heads"),
])
def test_size_the_model_cannot_split_evenly_is_refused(config, message):
    devices = [SimpleNamespace(platform="cpu", device_kind="cpu")] * 4
    with pytest.raises(ValueError, match=message):
        make_mesh(4, config, devices=devices)


def test_engine_config_takes_the_pallas_backends_split_over_devices_and_refuses_size_0():
    # The Pallas kernels run under shard_map (models.tp_kernels; tests/worker/
    # test_tensor_parallel_kernels.py checks their outputs).
    config = EngineConfig(model="m", tensor_parallel_size=2, lora_backend="pallas",
                          attention_backend="pallas")
    assert (config.lora_backend, config.attention_backend) == ("pallas", "pallas")
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        EngineConfig(model="m", tensor_parallel_size=0)
