"""An adapter that lora-jax trained gives transformers + PEFT's logits when lora-jax serves it.

The adapter under tests/fixtures/reference/trained/adapters/ was written by scripts/train_lora.py
on the gqa base model; scripts/make_reference_fixtures.py loaded it with
peft.PeftModel.from_pretrained and wrote the expected logits (see the README there).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.fixtures import Reference

from lora_jax.lora.adapters import load_adapter
from models import init_kv_cache, init_lora_stacks, load_llama, pack_adapter, set_slot

ATOL = 1e-4


@pytest.fixture(scope="module")
def trained():
    ref = Reference("trained")
    model = load_llama(ref.dir / ref.manifest["base_model"])
    return ref, model


def _logits(model, prompt: list[int], lora=None) -> np.ndarray:
    """[len(prompt), vocab]: the base model (lora None), or the adapter in lora's slot 0."""
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    cache = init_kv_cache(model.config, 1, len(prompt))
    slot = None if lora is None else jnp.zeros(1, jnp.int32)
    hidden, _ = model(tokens, positions, cache, jnp.zeros(1, jnp.int32), lora, slot)
    return np.asarray(model.logits(hidden))[0]


def test_trained_fixture_adapter_is_peft_with_the_trainer_config(trained):
    ref, _ = trained
    [name] = ref.adapters
    entry = ref.manifest["adapters"][name]
    assert (entry["r"], entry["lora_alpha"], entry["use_rslora"]) == (4, 8.0, True)
    assert entry["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_adapter_trained_here_gives_transformers_peft_logits_in_lora_jax(trained):
    ref, model = trained
    for name in ref.adapters:
        adapter = load_adapter(ref.adapter_path(name), base=model.config)
        stacks = set_slot(init_lora_stacks(model.config, 1, adapter.rank), 0,
                          pack_adapter(model.config, adapter.modules, adapter.rank))
        for j in range(ref.num_prompts):
            base = _logits(model, ref.prompt(j))
            np.testing.assert_allclose(base, ref.logits("base", j), atol=ATOL, rtol=0)
            mine = _logits(model, ref.prompt(j), stacks)
            np.testing.assert_allclose(mine, ref.logits(name, j), atol=ATOL, rtol=0)
            assert np.abs(mine - base).max() > 0.1  # the adapter matters in this comparison
