"""Training LoRA adapters: data and loss masks, the multi-adapter step, PEFT folders."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from helpers.checkpoints import by_field, write_checkpoint

from lora_jax.lora.adapters import load_adapter
from lora_jax.tokenizer import TextTokenizer
from lora_jax.tools.tiny import char_tokenizer, config_dict, tiny_config
from lora_jax.training.datasets import Example, make_batch, read_records, tokenize
from lora_jax.training.trainer import AdapterSpec, LoRATrainer, TrainConfig
from models import load_llama
from models.lora import EXPAND, PACKED

CONFIG = tiny_config(hidden_size=32)
SEQ = 16
QV = ("q_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random base with O(1) logits (unlike fresh init's tiny ones) and a char tokenizer."""
    folder = write_checkpoint(tmp_path_factory.mktemp("base"), config_dict(CONFIG))
    char_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def _shift_task(n: int, seed: int, shift: int = 1) -> list[Example]:
    """Prompt: bos + 5 random ids; completion: the same ids plus `shift`, then eos."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, 60, (n, 5))
    return [Example((1, *p.tolist()), (*(p + shift).tolist(), 2)) for p in prompts]


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_jsonl_pairs_learn_only_the_completion_and_its_eos(base, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "ab=", "completion": "AB"}\n\n')
    [example] = tokenize(read_records(tmp_path / "d.jsonl"), TextTokenizer(base, 1), 2)
    tok = char_tokenizer()
    assert example.prompt_ids == (1, *tok.encode("ab=").ids)
    assert example.completion_ids == (*tok.encode("AB").ids, 2)
    batch = make_batch([(example, 3), None], 8)
    # Positions 0..3 hold <s> a b =; the "=" (position 3) predicts A, then B, then eos.
    assert batch.weights[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert batch.targets[0, 3:6].tolist() == list(example.completion_ids)
    assert batch.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, -1]
    assert batch.slot.tolist() == [3, -1] and not batch.weights[1].any()


def test_text_file_lines_are_examples_learned_whole(base, tmp_path):
    (tmp_path / "d.txt").write_text("hello\n\nworld\n")
    records = read_records(tmp_path / "d.txt")
    assert records == [{"text": "hello"}, {"text": "world"}]
    example = tokenize(records, TextTokenizer(base, 1), 2)[0]
    assert example.prompt_ids == (1,) and len(example.completion_ids) == 6
    assert make_batch([(example, 0)], 8).weights[0].sum() == 6


def test_jsonl_line_without_prompt_and_completion_is_rejected_by_line_number(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="line 2 needs 'prompt' and 'completion'"):
        read_records(tmp_path / "d.jsonl")


def test_adapter_spec_and_train_config_name_the_bad_field():
    with pytest.raises(ValueError, match="target_modules"):
        AdapterSpec("x", target_modules=("lm_head",))
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_training_lowers_train_and_held_out_loss_on_a_bfloat16_base(base):
    spec = AdapterSpec("shift", target_modules=QV + MLP)
    trainer = LoRATrainer(load_llama(base, "bfloat16"), [spec],
                          TrainConfig(steps=30, batch_size=8, seq_len=SEQ, learning_rate=1e-2,
                                      warmup_steps=3, eval_every=15))
    held_out = [_shift_task(16, seed=1)]
    before = trainer.evaluate(held_out)["shift"]
    history = trainer.train([_shift_task(64, seed=0)], held_out, progress=False)
    assert [h["step"] for h in history if "eval_loss" in h] == [15, 30]
    assert history[-1]["loss"]["shift"] < 0.8 * history[0]["loss"]["shift"]
    assert history[-1]["eval_loss"]["shift"] < 0.9 * before
    # Every target learned, v_proj too, whose only way to the loss is through the KV cache.
    trained = trainer.adapters()[0].modules
    assert all(np.abs(trained[proj].b).max() > 0 for proj in QV + MLP), {
        proj: float(np.abs(w.b).max()) for proj, w in trained.items()}


# Two adapters of different rank, targets and scaling, each with its own data.
SPECS = [AdapterSpec("qv", rank=4, alpha=8, target_modules=QV, seed=1),
         AdapterSpec("mlp", rank=8, alpha=4, use_rslora=True, target_modules=MLP, seed=2)]
DATA = [_shift_task(40, seed=3, shift=1), _shift_task(24, seed=4, shift=2)]
TOGETHER = TrainConfig(steps=8, batch_size=4, seq_len=SEQ, learning_rate=1e-2, warmup_steps=2)


@pytest.fixture(scope="module")
def together(base):
    trainer = LoRATrainer(load_llama(base), SPECS, TOGETHER)
    trainer.train(DATA, progress=False)
    return trainer


def test_two_adapters_trained_together_equal_each_trained_alone(base, together):
    alone = []
    for spec, examples in zip(SPECS, DATA, strict=True):
        trainer = LoRATrainer(load_llama(base), [spec], TOGETHER)
        trainer.train([examples], progress=False)
        alone.append(trainer.adapters()[0])
    for mine, single in zip(together.adapters(), alone, strict=True):
        assert mine.modules.keys() == single.modules.keys()
        assert np.abs(mine.modules[next(iter(mine.modules))].b).max() > 1e-3  # it did train
        diff = _max_diff({k: (w.a, w.b) for k, w in mine.modules.items()},
                         {k: (w.a, w.b) for k, w in single.modules.items()})
        assert diff < 1e-5, f"{mine.name}: together vs alone differ by {diff}"


def test_projections_an_adapter_does_not_target_stay_exactly_zero(together):
    params, r = jax.tree.map(np.asarray, together.params), together.max_rank
    for slot, spec in enumerate(together.specs):
        for field, group in PACKED.items():
            for i, proj in enumerate(group):
                a = by_field(params, field)[:, slot, :, i * r:(i + 1) * r]  # [L, S, D, n*R]
                b = by_field(params, EXPAND[proj])[:, slot]
                live = spec.rank if proj in spec.target_modules else 0
                assert not a[..., live:].any() and not b[:, live:].any(), (spec.name, proj)


def test_saved_adapters_are_peft_folders_that_load_back_to_the_trained_weights(
        together, tmp_path):
    folders = together.save(tmp_path, base_model_name_or_path="tiny-base")
    for folder, spec, trained in zip(folders, together.specs, together.adapters(), strict=True):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert folder.name == spec.name
        assert {k: config[k] for k in ("base_model_name_or_path", "r", "lora_alpha",
                                       "target_modules", "use_rslora")} == {
            "base_model_name_or_path": "tiny-base", "r": spec.rank, "lora_alpha": spec.alpha,
            "target_modules": sorted(spec.target_modules), "use_rslora": spec.use_rslora}
        loaded = load_adapter(str(folder), base=CONFIG)
        for proj, w in trained.modules.items():
            np.testing.assert_array_equal(loaded.modules[proj].a, w.a)
            np.testing.assert_allclose(loaded.modules[proj].b, w.b, rtol=1e-6, atol=1e-9)


def test_two_accumulated_half_batches_take_the_same_step_as_one_full_batch(base):
    spec, data = AdapterSpec("acc", target_modules=QV, seed=5), [_shift_task(32, seed=6)]
    config = TrainConfig(steps=4, batch_size=8, seq_len=SEQ, learning_rate=1e-2)
    full = LoRATrainer(load_llama(base), [spec], config)
    half_config = dataclasses.replace(config, batch_size=4, grad_accum=2)
    half = LoRATrainer(load_llama(base), [spec], half_config)
    full.train(data, progress=False)
    half.train(data, progress=False)
    assert _max_diff(full.params, half.params) < 1e-5


def test_dropout_changes_the_step_and_a_fixed_seed_repeats_it(base):
    spec, data = AdapterSpec("drop", target_modules=QV, seed=7), [_shift_task(16, seed=8)]
    config = TrainConfig(steps=3, batch_size=4, seq_len=SEQ, learning_rate=1e-2, dropout=0.5)
    runs = [LoRATrainer(load_llama(base), [spec], c) for c in
            (config, config, dataclasses.replace(config, dropout=0.0))]
    for trainer in runs:
        trainer.train(data, progress=False)
    assert _max_diff(runs[0].params, runs[1].params) == 0.0
    assert _max_diff(runs[0].params, runs[2].params) > 1e-4
