"""The shard-major layout of packed projections, and the tensor-parallel config."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.config import LlamaConfig
from models.layers import split_packed
from models.sharding import interleave, sharded_config


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_split_packed_recovers_each_part_of_a_shard_major_matmul(shards):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 16)).astype(np.float32)
    parts = [rng.normal(size=(16, w)).astype(np.float32) for w in (32, 8, 8)]
    y = jnp.asarray(x) @ jnp.asarray(interleave(parts, shards))
    for got, w in zip(split_packed(y, (32, 8, 8), shards), parts, strict=True):
        np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shards", [2, 4])
def test_shard_major_columns_give_each_shard_only_its_own_heads(shards):
    q = np.arange(32)[None].repeat(2, 0)  # 4 heads of 8, labelled by column
    k = 100 + np.arange(8)[None].repeat(2, 0)
    packed = interleave([q, k], shards)
    qw, kw = 32 // shards, 8 // shards
    for i, block in enumerate(np.split(packed, shards, axis=1)):  # what device i holds
        assert block[0].tolist() == (list(range(i * qw, (i + 1) * qw))
                                     + list(range(100 + i * kw, 100 + (i + 1) * kw)))


def test_sharded_config_repeats_kv_heads_up_to_the_shard_count():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=16)
    assert sharded_config(config, 2).num_key_value_heads == 2
    assert sharded_config(config, 4).packed_shards == 4
    assert sharded_config(config, 1) == config
