"""LoRA stacks: packing an adapter into a slot, swapping slots in place, packed projections."""

from dataclasses import fields

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.checkpoints import LoraModule, by_field, random_lora, tiny_config

from models import LayerLora, LlamaConfig, init_lora_stacks, pack_adapter, set_slot
from models.layers import TokenBatch, project, with_lora_meta
from models.lora import SITES, SLOT_AXIS, sites_of
from pallas_kernels import lora_apply

CONFIG = LlamaConfig.from_dict(tiny_config())


def test_stacks_are_zeros_shaped_layers_by_slots():
    stacks = init_lora_stacks(CONFIG, num_slots=3, max_rank=8, dtype=jnp.bfloat16)
    assert len(stacks.layers) == 2
    layer = stacks.layer(1)
    assert layer.qkv_a.shape == (3, 64, 3 * 8) and layer.k_b.shape == (3, 8, 32)
    assert layer.gate_up_a.shape == (3, 64, 16) and layer.down_a.shape == (3, 96, 8)
    assert (stacks.num_slots, stacks.max_rank) == (3, 8)
    assert all(x.dtype == jnp.bfloat16 and not x.any() for x in jax.tree.leaves(stacks))


def test_pack_adapter_zero_pads_the_rank_and_leaves_absent_projections_zero():
    lora = random_lora(CONFIG, targets=("q_proj", "v_proj", "up_proj"), rank=3)
    packed = pack_adapter(CONFIG, lora, max_rank=8)
    qkv_a = by_field(packed, "qkv_a")  # [L, D, 3 * 8]: columns q 0..7, k 8..15, v 16..23
    np.testing.assert_array_equal(qkv_a[:, :, 0:3], lora["q_proj"].a)
    np.testing.assert_array_equal(qkv_a[:, :, 16:19], lora["v_proj"].a)
    assert not qkv_a[:, :, 3:16].any() and not qkv_a[:, :, 19:].any()
    np.testing.assert_array_equal(by_field(packed, "up_b")[:, :3], lora["up_proj"].b)
    np.testing.assert_array_equal(by_field(packed, "gate_up_a")[:, :, 8:11], lora["up_proj"].a)
    assert not by_field(packed, "k_b").any() and not by_field(packed, "gate_b").any()
    assert not by_field(packed, "down_a").any() and not by_field(packed, "o_b").any()


def test_adapter_with_rank_above_max_rank_is_rejected():
    with pytest.raises(ValueError, match="rank 16 above max_rank 8"):
        pack_adapter(CONFIG, random_lora(CONFIG, rank=16), max_rank=8)


def test_adapter_with_wrong_shapes_is_rejected_naming_the_module():
    lora = {"k_proj": LoraModule(np.zeros((2, 64, 4)), np.zeros((2, 4, 64)))}
    with pytest.raises(ValueError, match="'k_proj'"):
        pack_adapter(CONFIG, lora, max_rank=8)


def test_adapter_targeting_an_unknown_module_is_rejected():
    lora = {"lm_head": LoraModule(np.zeros((2, 64, 4)), np.zeros((2, 4, 128)))}
    with pytest.raises(ValueError, match="lm_head"):
        pack_adapter(CONFIG, lora, max_rank=8)


def test_set_slot_replaces_one_slot_in_place_under_jit_without_recompiling():
    traces = []

    def swap(stacks, slot, packed):
        traces.append(None)
        return set_slot(stacks, slot, packed)

    swap = jax.jit(swap, donate_argnums=0)
    stacks = init_lora_stacks(CONFIG, num_slots=3, max_rank=4)
    first = pack_adapter(CONFIG, random_lora(CONFIG, rank=4, seed=1), 4)
    second = pack_adapter(CONFIG, random_lora(CONFIG, rank=2, seed=2), 4)
    stacks = swap(stacks, jnp.int32(2), first)
    stacks = swap(stacks, jnp.int32(0), second)
    assert len(traces) == 1
    for layer, one, two in zip(stacks.layers, first.layers, second.layers, strict=True):
        for field in fields(LayerLora):
            got = np.moveaxis(np.asarray(getattr(layer, field.name)), SLOT_AXIS[field.name], 0)
            np.testing.assert_array_equal(got[2], getattr(one, field.name))
            np.testing.assert_array_equal(got[0], getattr(two, field.name))
            assert not got[1].any()


def test_set_slot_rejects_an_adapter_packed_for_another_max_rank():
    stacks = init_lora_stacks(CONFIG, num_slots=2, max_rank=4)
    with pytest.raises(ValueError, match="qkv_a"):
        set_slot(stacks, 0, pack_adapter(CONFIG, {}, max_rank=8))


def test_a_q_and_v_only_adapter_in_the_packed_qkv_equals_separate_projections():
    lora = random_lora(CONFIG, targets=("q_proj", "v_proj"), rank=4, seed=3)
    stacks = set_slot(init_lora_stacks(CONFIG, 2, 4), 1, pack_adapter(CONFIG, lora, 4))
    layer = stacks.layer(0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    w = {name: jnp.asarray(rng.standard_normal((64, width)) / 8, jnp.float32)
         for name, width in (("q", 64), ("k", 32), ("v", 32))}
    slot = jnp.array([1, -1, 1, 0, 1], jnp.int32)
    batch = TokenBatch(None, None, None, None, slot, None)
    # The model stores weights [d_out, d_in]: the packed q|k|v matrix is the three transposed.
    packed = project(x, jnp.concatenate([w["q"], w["k"], w["v"]], axis=1).T, layer.qkv_a,
                     (layer.q_b, layer.k_b, layer.v_b), batch)
    q, k, v = np.split(np.asarray(packed), [64, 96], axis=1)

    def separate(name, a, b):
        y = jnp.dot(x, w[name], preferred_element_type=jnp.float32)
        single = jnp.stack([jnp.zeros_like(jnp.asarray(a)), jnp.asarray(a)])  # slot 1 only
        return np.asarray(lora_apply(y, x, single, jnp.stack([jnp.zeros_like(b), b]), slot))

    np.testing.assert_allclose(k, np.asarray(jnp.dot(x, w["k"])), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q, separate("q", lora["q_proj"].a[0], lora["q_proj"].b[0]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, separate("v", lora["v_proj"].a[0], lora["v_proj"].b[0]),
                               rtol=1e-6, atol=1e-6)


def test_a_lora_site_no_adapter_of_the_step_uses_skips_its_adapter_work():
    lora = random_lora(CONFIG, targets=("q_proj", "v_proj", "o_proj"), rank=4, seed=5)
    assert sites_of(lora).tolist() == [s in ("qkv_a", "o_a") for s in SITES]
    layer = set_slot(init_lora_stacks(CONFIG, 2, 4), 1, pack_adapter(CONFIG, lora, 4)).layer(0)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)
    slot = jnp.array([1, -1, 1, 1], jnp.int32)
    site = SITES.index("o_a")

    def o_proj(sites):
        def run(x):  # the step's metadata built as the model builds it (the tiled backend)
            batch = with_lora_meta(TokenBatch(None, None, None, None, slot, "tiled",
                                              lora_sites=sites), 2)
            return project(x, w, layer.o_a, (layer.o_b,), batch, site=site)
        return np.asarray(jax.jit(run)(x))

    every = o_proj(None)
    assert not np.allclose(every, np.asarray(x @ w.T))  # the adapter changes o here
    np.testing.assert_array_equal(o_proj(jnp.asarray(sites_of(lora))), every)
    # Flagged unused, the site gives exactly the base projection: its adapter work is skipped.
    np.testing.assert_array_equal(o_proj(jnp.zeros(len(SITES), bool)),
                                  np.asarray(jnp.einsum("ti,oi->to", x, w)))
