"""The forward pass against an independent float64 NumPy Llama with transformers' semantics.

The NumPy model reads the HF-named tensors directly (unpacked projections, [d_out, d_in]), so
these tests also check the loader's transposes and packing, RoPE variants, GQA/MQA, tied
embeddings and the LoRA mapping, before any transformers fixture exists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.checkpoints import random_lora, random_tensors, tiny_config, write_checkpoint
from helpers.numpy_llama import reference_logits

from models import LlamaConfig, forward, init_kv_cache, init_lora_stacks, load_llama, pack_adapter
from models import set_slot as set_slot_fn
from models.kv_cache import read_layer
from models.layers import _activation, matmul

MAX_LEN, PREFILL = 16, 8

_forward = jax.jit(forward, static_argnums=0, static_argnames="lora_backend")
_logits = jax.jit(lambda g, s, h: nnx.merge(g, s).logits(h), static_argnums=0)


def run(model, tokens, positions, cache, rows, lora=None, slots=None, rope_scale=None):
    """One jitted step -> (logits [B, L, V] float32 numpy, new cache)."""
    graphdef, state = nnx.split(model)
    as_i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    hidden, cache = _forward(graphdef, state, as_i32(tokens), as_i32(positions), cache,
                             as_i32(rows), lora, as_i32(slots),
                             None if rope_scale is None else jnp.asarray(rope_scale, jnp.float32))
    return np.asarray(_logits(graphdef, state, hidden)), cache


def prefill_batch(prompts, length=PREFILL):
    """Left-aligned prompts -> tokens, positions [B, length] with -1 padding."""
    tokens = np.zeros((len(prompts), length), np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)], positions[b, :len(p)] = p, np.arange(len(p))
    return tokens, positions


PROMPTS = [[3, 17, 42, 5, 99, 64, 7, 11], [8, 1, 120], [77, 23, 4, 4, 31, 2], [50]]
ADAPTERS = [("all_r4", dict(rank=4, seed=1)),
            ("qv_r2", dict(targets=("q_proj", "v_proj"), rank=2, seed=2)),
            ("mlp_r8", dict(targets=("gate_proj", "up_proj", "down_proj"), rank=8, seed=3))]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """The tiny GQA checkpoint, its model, and three adapters packed into slots 0..2."""
    folder = tmp_path_factory.mktemp("gqa")
    tensors = random_tensors(tiny_config())
    model = load_llama(write_checkpoint(folder, tensors=tensors))
    config = model.config
    adapters = {name: random_lora(config, **kw) for name, kw in ADAPTERS}
    stacks = init_lora_stacks(config, num_slots=4, max_rank=8)
    for slot, modules in enumerate(adapters.values()):
        stacks = set_slot_fn(stacks, slot, pack_adapter(config, modules, max_rank=8))
    return model, tensors, adapters, stacks


@pytest.mark.parametrize("slot", [-1, 0, 1, 2])
def test_prefill_equals_the_numpy_reference_for_base_and_each_adapter(gqa, slot):
    model, tensors, adapters, stacks = gqa
    tokens, positions = prefill_batch(PROMPTS)
    cache = init_kv_cache(model.config, 4, MAX_LEN)
    logits, _ = run(model, tokens, positions, cache, [0, 1, 2, 3], stacks, [slot] * 4)
    lora = None if slot < 0 else list(adapters.values())[slot]
    for b, prompt in enumerate(PROMPTS):
        want = reference_logits(tensors, model.config, prompt, lora)
        np.testing.assert_allclose(logits[b, :len(prompt)], want, atol=1e-4, rtol=1e-4)


def test_decode_token_by_token_through_the_cache_equals_prefill(gqa):
    model, _, _, stacks = gqa
    slots, rows = [0, -1, 1, 2], [3, 0, 2, 1]  # rows need not follow batch order
    tokens, positions = prefill_batch(PROMPTS)
    whole, _ = run(model, tokens, positions, init_kv_cache(model.config, 4, MAX_LEN), rows,
                   stacks, slots)
    cache = init_kv_cache(model.config, 4, MAX_LEN)
    first = prefill_batch([p[:1] for p in PROMPTS])
    logits, cache = run(model, *first, cache, rows, stacks, slots)
    steps = [logits[:, 0]]
    for t in range(1, PREFILL):  # sequences of different lengths: finished ones decode padding
        tok = np.array([[p[t] if t < len(p) else 0] for p in PROMPTS], np.int32)
        pos = np.array([[t if t < len(p) else -1] for p in PROMPTS], np.int32)
        step, cache = run(model, tok, pos, cache, rows, stacks, slots)
        steps.append(step[:, 0])
    decoded = np.stack(steps, axis=1)
    for b, prompt in enumerate(PROMPTS):
        np.testing.assert_allclose(decoded[b, :len(prompt)], whole[b, :len(prompt)], atol=1e-5)


def test_a_batch_mixing_all_adapters_and_the_base_gives_each_row_its_result_alone(gqa):
    model, _, _, stacks = gqa
    slots = [2, -1, 0, 1]
    tokens, positions = prefill_batch(PROMPTS)
    mixed, _ = run(model, tokens, positions, init_kv_cache(model.config, 4, MAX_LEN),
                   [0, 1, 2, 3], stacks, slots)
    for b, prompt in enumerate(PROMPTS):
        alone, _ = run(model, *prefill_batch([prompt]), init_kv_cache(model.config, 1, MAX_LEN),
                       [0], stacks, [slots[b]])
        np.testing.assert_allclose(mixed[b, :len(prompt)], alone[0, :len(prompt)], atol=1e-5)


def test_slot_minus_one_gives_exactly_the_model_without_lora(gqa):
    model, _, _, stacks = gqa
    tokens, positions = prefill_batch(PROMPTS)
    cache = init_kv_cache(model.config, 4, MAX_LEN)
    with_stacks, _ = run(model, tokens, positions, cache, [0, 1, 2, 3], stacks, [-1] * 4)
    without, _ = run(model, tokens, positions, cache, [0, 1, 2, 3])
    np.testing.assert_array_equal(with_stacks, without)


def test_a_prefill_chunk_can_start_at_any_position(gqa):
    model, _, _, stacks = gqa
    prompt = PROMPTS[0]
    whole, _ = run(model, *prefill_batch([prompt]), init_kv_cache(model.config, 1, MAX_LEN),
                   [0], stacks, [1])
    cache = init_kv_cache(model.config, 1, MAX_LEN)
    _, cache = run(model, *prefill_batch([prompt[:3]]), cache, [0], stacks, [1])
    tokens = np.zeros((1, PREFILL), np.int32)
    positions = np.full((1, PREFILL), -1, np.int32)
    tokens[0, :5], positions[0, :5] = prompt[3:], np.arange(3, 8)
    chunk, _ = run(model, tokens, positions, cache, [0], stacks, [1])
    np.testing.assert_allclose(chunk[0, :5], whole[0, 3:], atol=1e-5)


def test_padding_is_not_written_and_other_rows_are_untouched(gqa):
    model, _, _, _ = gqa
    cache = init_kv_cache(model.config, 4, MAX_LEN)
    cache = jax.tree.map(lambda x: x + 7.0, cache)
    tokens, positions = prefill_batch([[5, 6, 7]])
    _, cache = run(model, tokens, positions, cache, [2])
    k = np.asarray(cache.k)
    assert np.all(k[:, 2, 3:] == 7.0) and np.all(k[:, [0, 1, 3]] == 7.0)
    assert not np.any(k[:, 2, :3] == 7.0)


def test_rope_scale_on_a_row_equals_a_checkpoint_with_linear_rope_scaling(gqa, tmp_path):
    model, tensors, _, _ = gqa
    scaled = load_llama(write_checkpoint(
        tmp_path, tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}),
        tensors=tensors))
    tokens, positions = prefill_batch([PROMPTS[0]])
    want, _ = run(scaled, tokens, positions, init_kv_cache(model.config, 1, MAX_LEN), [0])
    got, _ = run(model, tokens, positions, init_kv_cache(model.config, 1, MAX_LEN), [0],
                 rope_scale=[4.0])
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain, _ = run(model, tokens, positions, init_kv_cache(model.config, 1, MAX_LEN), [0])
    assert np.abs(plain - want).max() > 1e-3


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=8),
    dict(rope_scaling=LLAMA3, rope_theta=500000.0),
    dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=4),
    dict(rope_scaling={"type": "linear", "factor": 2.0}),
], ids=["mqa_tied_head_dim", "llama3", "dynamic", "linear"])
def test_config_variants_equal_the_numpy_reference(tmp_path, overrides):
    config = tiny_config(**overrides)
    tensors = random_tensors(config, seed=5)
    model = load_llama(write_checkpoint(tmp_path, config, tensors=tensors))
    lora = random_lora(model.config, rank=4, seed=6)
    stacks = set_slot_fn(init_lora_stacks(model.config, 1, 4), 0,
                         pack_adapter(model.config, lora, 4))
    logits, _ = run(model, *prefill_batch([PROMPTS[0]]), init_kv_cache(model.config, 1, MAX_LEN),
                    [0], stacks, [0])
    want = reference_logits(tensors, model.config, PROMPTS[0], lora)
    np.testing.assert_allclose(logits[0], want, atol=1e-4, rtol=1e-4)


def test_bfloat16_weights_compute_in_bfloat16_and_stay_near_float32(gqa, tmp_path):
    model, tensors, _, _ = gqa
    bf16 = load_llama(write_checkpoint(tmp_path, tensors=tensors, dtype="bfloat16"))
    assert bf16.dtype == jnp.bfloat16 and bf16.layers[0].qkv[...].dtype == jnp.bfloat16
    cache = init_kv_cache(bf16.config, 1, MAX_LEN, jnp.bfloat16)
    tokens, positions = prefill_batch([PROMPTS[0]])
    got, cache = run(bf16, tokens, positions, cache, [0])
    want, f32_cache = run(model, tokens, positions, init_kv_cache(model.config, 1, MAX_LEN),
                          [0])
    assert got.dtype == np.float32 and cache.dtype == "bfloat16"
    # The cache keeps bfloat16 bits and reads them back as the bfloat16 keys the model wrote.
    keys = read_layer(cache.k, 1, jnp.array([0]), cache.dtype, window=len(PROMPTS[0]))
    want_keys = read_layer(f32_cache.k, 1, jnp.array([0]), "float32", window=len(PROMPTS[0]))
    assert keys.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(keys, np.float32), want_keys, atol=0.1, rtol=0.05)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_split_merge_under_jit_compiles_once_per_shape_and_takes_weights_as_arguments(gqa):
    model, _, _, stacks = gqa
    graphdef, state = nnx.split(model)
    traces = []

    def step(state, tokens, positions, cache, rows, lora, slots):
        traces.append(tokens.shape)
        hidden, cache = nnx.merge(graphdef, state)(tokens, positions, cache, rows, lora, slots)
        return nnx.merge(graphdef, state).logits(hidden), cache

    step = jax.jit(step, donate_argnums=3)
    tokens, positions = (jnp.asarray(x) for x in prefill_batch(PROMPTS))
    rows, slots = jnp.arange(4, dtype=jnp.int32), jnp.array([0, 1, -1, 2], jnp.int32)
    first, cache = step(state, tokens, positions, init_kv_cache(model.config, 4, MAX_LEN), rows,
                        stacks, slots)
    doubled = jax.tree.map(lambda x: 2 * x, state)
    second, cache = step(doubled, tokens + 1, positions, cache, rows, stacks, slots)
    assert traces == [(4, PREFILL)]
    assert not np.allclose(first, second)


def test_an_unknown_lora_backend_is_passed_through_and_rejected(gqa):
    model, _, _, stacks = gqa
    with pytest.raises(ValueError, match="no_such_backend"):
        model(*(jnp.asarray(x) for x in prefill_batch([[1, 2]])),
              init_kv_cache(model.config, 1, MAX_LEN), jnp.zeros(1, jnp.int32), stacks,
              jnp.zeros(1, jnp.int32), lora_backend="no_such_backend")


def test_arguments_of_the_wrong_batch_size_are_rejected_by_name(gqa):
    model, _, _, stacks = gqa
    tokens, positions = (jnp.asarray(x) for x in prefill_batch([[1, 2], [3]]))
    cache = init_kv_cache(model.config, 2, MAX_LEN)
    with pytest.raises(ValueError, match="cache_rows"):
        model(tokens, positions, cache, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="adapter_slot"):
        model(tokens, positions, cache, jnp.zeros(2, jnp.int32), stacks, jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="adapter_slot is required"):
        model(tokens, positions, cache, jnp.zeros(2, jnp.int32), stacks)


def test_a_kv_window_covering_every_position_changes_nothing(gqa):
    model, _, _, stacks = gqa
    tokens, positions = prefill_batch(PROMPTS)  # every position is below PREFILL
    graphdef, state = nnx.split(model)
    step = jax.jit(forward, static_argnums=0, static_argnames=("kv_window",))
    args = (graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
            init_kv_cache(model.config, 4, MAX_LEN), jnp.arange(4, dtype=jnp.int32), stacks,
            jnp.asarray([0, -1, 1, 2], jnp.int32))
    whole, whole_cache = step(*args)
    windowed, windowed_cache = step(*args, kv_window=PREFILL)
    live = positions >= 0
    np.testing.assert_allclose(np.asarray(windowed)[live], np.asarray(whole)[live], atol=1e-6)
    np.testing.assert_array_equal(windowed_cache.k, whole_cache.k)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_a_bfloat16_activation_is_computed_in_float32_and_rounded_once(act):
    # PyTorch computes a 16-bit activation in float32 and rounds the
    # result once; rounding after each elementwise step drifts from transformers.
    config = LlamaConfig.from_dict(tiny_config(hidden_act=act))
    gate = jax.random.normal(jax.random.key(0), (64, 96), jnp.float32).astype(jnp.bfloat16) * 4
    x = np.asarray(gate, np.float64)
    if act == "silu":
        want = x / (1 + np.exp(-x))
    else:
        want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    got = np.asarray(jax.jit(lambda g: _activation(config, g))(gate).astype(jnp.float32))
    assert _activation(config, gate).dtype == jnp.bfloat16
    # Rounded once from float32: within one bfloat16 step of the exact value (7 stored
    # mantissa bits), everywhere; rounding after each operation strays up to three steps.
    step = 2.0 ** (np.floor(np.log2(np.abs(want) + 1e-38)) - 7)
    assert np.all(np.abs(got - want) <= step + 1e-6), np.max(np.abs(got - want) / step)


@pytest.mark.parametrize("rows", [8, 32, 48, 64, 128])
def test_a_matmul_of_any_row_count_equals_the_float64_product_and_its_gradient(rows):
    # 32-64 rows take another operand order on the CPU (models.layers.matmul): the value and
    # the gradients (training runs through it) must be the product's at every row count.
    kx, kw, kg = jax.random.split(jax.random.key(rows), 3)
    x = jax.random.normal(kx, (rows, 80), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (96, 80), jnp.float32).astype(jnp.bfloat16)
    cot = jax.random.normal(kg, (rows, 96), jnp.float32)
    got = jax.jit(matmul)(x, w)
    assert got.shape == (rows, 96) and got.dtype == jnp.float32
    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, cot))
    np.testing.assert_allclose(np.asarray(got), x64 @ w64.T, rtol=1e-5, atol=1e-4)
    gx, gw = jax.jit(jax.grad(lambda a, b: jnp.sum(matmul(a, b) * cot), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(np.asarray(gx, np.float64), c64 @ w64, rtol=2e-2, atol=0.1)
    np.testing.assert_allclose(np.asarray(gw, np.float64), c64.T @ x64, rtol=2e-2, atol=0.1)
