"""Training on the model families' reference checkpoints (tests/fixtures/reference/<family>) with
target modules as each family names them. Phi-3's fused qkv_proj and gate_up_proj train one A
per module (shared by its parts), as PEFT does, and are saved as those PEFT modules with the
rank asked for; every family's loss goes down."""

import json

import numpy as np
import pytest
from helpers.fixtures import Reference
from safetensors.numpy import load_file

from lora_jax.lora.adapters import load_adapter
from lora_jax.training.datasets import Example
from lora_jax.training.trainer import AdapterSpec, LoRATrainer, TrainConfig
from models import LlamaConfig, load_llama

FAMILIES = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
PHI3_FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CONFIG = TrainConfig(steps=10, batch_size=8, seq_len=12, learning_rate=5e-2, max_grad_norm=1.0)


def _shift_task(n: int, seed: int) -> list[Example]:
    """Prompt: bos + 5 random ids; completion: the same ids plus one, then eos."""
    prompts = np.random.default_rng(seed).integers(3, 60, (n, 5))
    return [Example((1, *p.tolist()), (*(p + 1).tolist(), 2)) for p in prompts]


def _train(family: str, targets) -> tuple[LoRATrainer, tuple[float, float]]:
    """The trainer after CONFIG.steps, and its loss on the training examples before and after
    (B starts at zero: the first is the base model's)."""
    model = load_llama(Reference(family).model)
    trainer = LoRATrainer(model, [AdapterSpec("a", rank=2, alpha=4.0, target_modules=targets)],
                          CONFIG)
    task = _shift_task(32, 0)
    before = trainer.evaluate([task])["a"]
    trainer.train([task], progress=False)
    return trainer, (before, trainer.evaluate([task])["a"])


@pytest.fixture(scope="module")
def phi3():
    return _train("phi3", PHI3_FUSED)


@pytest.mark.slow
def test_phi3_fused_targets_share_one_a_per_module_and_lower_the_loss(phi3):
    trainer, (before, after) = phi3
    assert after < 0.8 * before, (before, after)
    [adapter] = trainer.adapters()
    m = adapter.modules
    assert set(m) == set(trainer.model_config.projection_shapes())
    for parts in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        for p in parts[1:]:
            np.testing.assert_array_equal(m[p].a, m[parts[0]].a)
    assert all(np.abs(w.b).max() > 0 for w in m.values())  # every module trained


@pytest.mark.slow
def test_phi3_fused_adapter_saves_as_peft_modules_and_loads_back(phi3, tmp_path):
    """PEFT's names and shapes for a LoRA on Phi-3's fused modules: qkv_proj A [r, hidden],
    B [q + k + v, r]; gate_up_proj B [2 * intermediate, r]; rank r, no rank_pattern."""
    trainer, _ = phi3
    base = trainer.model_config
    [folder] = trainer.save(tmp_path, base_model_name_or_path="phi3-tiny")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(PHI3_FUSED)
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2, 4.0, {})
    tensors = load_file(folder / "adapter_model.safetensors")
    shapes = base.projection_shapes()
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    d, i = base.hidden_size, base.intermediate_size
    want = {"self_attn.qkv_proj": ((2, d), (q + 2 * kv, 2)), "self_attn.o_proj": ((2, q), (d, 2)),
            "mlp.gate_up_proj": ((2, d), (2 * i, 2)), "mlp.down_proj": ((2, i), (d, 2))}
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{layer}.{module}.lora_{ab}.weight": shape[n]
        for layer in range(base.num_hidden_layers) for module, shape in want.items()
        for n, ab in enumerate("AB")}
    loaded = load_adapter(str(folder), base=base)
    for proj, w in trainer.adapters()[0].modules.items():
        np.testing.assert_allclose(loaded.modules[proj].a @ loaded.modules[proj].b, w.a @ w.b,
                                   atol=1e-6, rtol=1e-5, err_msg=proj)


def test_fused_target_on_a_family_without_it_is_refused_naming_the_parts():
    model = load_llama(Reference("mistral").model)
    with pytest.raises(ValueError, match=r"qkv_proj.*q_proj', 'k_proj', 'v_proj"):
        LoRATrainer(model, [AdapterSpec("a", target_modules=("qkv_proj",))], CONFIG)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_every_family_trains_on_all_its_modules(family):
    _, (before, after) = _train(family,
                                LlamaConfig.from_pretrained(Reference(family).model).peft_modules)
    assert after < 0.8 * before, (family, before, after)
